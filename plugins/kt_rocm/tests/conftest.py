"""Where the Triton kernel tests run: on any GPU Triton drives (an AMD GPU under ROCm, or an NVIDIA GPU:
the kernels and the HIP launch configurations are the same code), or in Triton's interpreter on CPU
tensors when ``TRITON_INTERPRET=1`` is set and Triton is installed. Otherwise they skip with the reason."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # rocm_samples (rel_err)


def triton_device() -> tuple[torch.device | None, str]:
    has_triton = importlib.util.find_spec("triton") is not None
    if torch.cuda.is_available() and has_triton:
        return torch.device("cuda"), ""
    if os.environ.get("TRITON_INTERPRET") == "1" and has_triton:
        return torch.device("cpu"), ""
    why = "no GPU (torch.cuda.is_available() is False)" if has_triton else "Triton is not installed"
    return None, f"Triton kernels cannot run here: {why}; TRITON_INTERPRET=1 with Triton installed runs them on the CPU"


@pytest.fixture
def device() -> torch.device:
    dev, reason = triton_device()
    if dev is None:
        pytest.skip(reason)
    return dev


def pytest_configure(config):
    config.addinivalue_line("markers", "rocm: needs an AMD GPU with a ROCm build of torch")
