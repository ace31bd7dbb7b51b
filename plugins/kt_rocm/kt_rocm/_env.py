"""Whether a ROCm build of torch, an AMD GPU Triton targets, and Triton are here, as ``available()`` text."""

from __future__ import annotations

import importlib.util

import torch

# gcnArchName prefixes Triton's AMD backend generates code for: CDNA2 (MI200), CDNA3 (MI300), CDNA4 (MI350),
# RDNA3 and RDNA4
TRITON_AMD_ARCHS = ("gfx90a", "gfx94", "gfx95", "gfx11", "gfx12")


def rocm_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """``None`` when kt-rocm's kernels can run on ``device`` (any GPU of this machine when ``None``)."""
    if device is not None and torch.device(device).type != "cuda":
        return f"runs on cuda devices (ROCm builds of torch name AMD GPUs 'cuda'), not {torch.device(device).type}"
    if getattr(torch.version, "hip", None) is None:
        return "this torch is not a ROCm build (torch.version.hip is None)"
    if not torch.cuda.is_available():
        return "no AMD GPU is visible to this ROCm build of torch (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (ROCm builds of torch come with pytorch-triton-rocm)"
    index = torch.device(device).index if device is not None else None
    props = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
    arch = getattr(props, "gcnArchName", "").split(":")[0]
    if not arch.startswith(TRITON_AMD_ARCHS):
        return f"{props.name} ({arch or 'unknown architecture'}) is not a Triton AMD target (gfx90a, gfx94x, gfx95x, gfx11xx, gfx12xx)"
    return None
