"""Helpers of the kt_cuda kernel tests (a uniquely named module: several plugins' tests run together)."""

from __future__ import annotations

import torch


def half_dtypes() -> list[torch.dtype]:
    """Activation dtypes to test: both halves on a GPU; float16 alone in the interpreter (numpy has no bf16)."""
    return [torch.float16, torch.bfloat16] if torch.cuda.is_available() else [torch.float16]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), "non-finite values in the output"
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
