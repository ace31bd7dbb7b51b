"""Why a kernel of this package cannot run here, as the text ``Op.available()`` returns."""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def triton_missing() -> bool:
    try:
        return importlib.util.find_spec("triton") is None
    except ValueError:  # sys.modules["triton"] is None: imports of it are blocked
        return True


def cuda_unavailable_reason(device: torch.device | str | None = None, min_capability: tuple[int, int] = (8, 0)) -> str | None:
    """``None`` when Triton kernels can run on ``device`` (any CUDA device when ``None``)."""
    if device is not None and torch.device(device).type != "cuda":
        return f"runs on cuda devices only, not {torch.device(device).type}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if torch.version.hip is not None:
        # a ROCm torch answers to "cuda" too, but these launch settings are tuned for NVIDIA
        return "this is a ROCm build of torch (torch.version.hip is set); kt-rocm's ops run here"
    if triton_missing():
        return "Triton is not installed (pip install triton)"
    index = torch.device(device).index if device is not None else None
    capability = torch.cuda.get_device_capability(index)
    if capability < min_capability:
        name = torch.cuda.get_device_name(index)
        return f"{name} has compute capability {capability[0]}.{capability[1]}; needs {min_capability[0]}.{min_capability[1]}"
    return None
