"""Comparison helper for the kt-rocm tests (the GGUF sample tensors are ``ktcore.testing.quantized_sample``)."""

from __future__ import annotations

import torch


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    assert torch.isfinite(got).all(), "non-finite values in the output"
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
