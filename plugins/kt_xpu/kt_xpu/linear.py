"""``KLinearXPU``: an ``nn.Linear`` through torch's XPU int4 weight-only GEMM."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ktcore.ops import Op
from ktcore.weights.affine import INT4_TYPES, compute_dtype as parse_compute_dtype

from ._env import xpu_unavailable_reason
from .quant_matrix import XPUQuantMatrix


class KLinearXPU(Op):
    """Weight-only int4 linear on an Intel GPU: Q4_0/Q4_1/Q4_K repacked exactly (scale per 32 weights,
    the per-group min added as a group-sum product); any other type, or a torch without the XPU int4
    kernels, runs as a dense matmul of the dequantized weight. Options: ``compute_dtype`` (``float16``,
    the default, or ``bfloat16``)."""

    name = "KLinearXPU"
    role = "linear"
    devices = ("xpu",)
    ggml_types = INT4_TYPES

    def __init__(self, module: nn.Module, device="xpu", compute_dtype: str = "float16", **kwargs):
        super().__init__(module, device, **kwargs)
        self.in_features = module.in_features
        self.out_features = module.out_features
        self.compute_dtype = parse_compute_dtype(self.name, compute_dtype)
        self.matrix: XPUQuantMatrix | None = None
        self.bias: torch.Tensor | None = None
        self.kernels = None  # None: torch's XPU kernels when this torch has them; tests pass reference kernels

    @classmethod
    def available(cls, device=None) -> str | None:
        return xpu_unavailable_reason(device)

    def load(self, weights: Mapping) -> None:
        weight = weights["weight"]
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{self.name}: {weight.name} has shape {tuple(weight.shape)}, expected {(self.out_features, self.in_features)}")
        self.matrix = XPUQuantMatrix(weight, self.device, self.compute_dtype, self.kernels)
        bias = weights.get("bias")
        self.bias = None if bias is None else bias.dequantize(dtype=self.compute_dtype, device=self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matrix is None:
            raise RuntimeError(f"{self.name}: forward() before load()")
        y = self.matrix.matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
