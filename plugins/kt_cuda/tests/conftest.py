"""Where kernel tests run: on a CUDA GPU, or (for debugging kernels without one) in Triton's interpreter
on CPU tensors when ``TRITON_INTERPRET=1`` is set and Triton is installed. Otherwise they skip with the
reason ``available()`` gives ("CUDA is not available")."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from kt_cuda._env import cuda_unavailable_reason


def kernel_device() -> tuple[torch.device | None, str]:
    reason = cuda_unavailable_reason()
    if reason is None:
        return torch.device("cuda"), ""
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
        return torch.device("cpu"), ""
    return None, reason


@pytest.fixture
def device() -> torch.device:
    dev, reason = kernel_device()
    if dev is None:
        pytest.skip(reason)
    return dev
