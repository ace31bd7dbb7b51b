"""``KLinearAscend``: an ``nn.Linear`` through ``npu_weight_quant_batchmatmul``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ktcore.ops import Op
from ktcore.weights.affine import AFFINE_TYPES, compute_dtype as parse_compute_dtype

from ._env import npu_unavailable_reason, require_torch_npu_for
from .quant_matrix import NPUQuantMatrix


class KLinearAscend(Op):
    """Weight-only-quantized linear on an Ascend NPU.

    Q4_0/Q4_1/Q4_K run as int4, Q5_0/Q5_1/Q5_K/Q8_0 as int8 (per-32 antiquant scale and offset, exact
    up to the scale/offset rounding to ``compute_dtype``); any other type is dequantized to
    ``compute_dtype`` and runs as a dense matmul. Options: ``compute_dtype`` (``float16``, the default,
    which every Atlas product takes, or ``bfloat16``).
    """

    name = "KLinearAscend"
    role = "linear"
    devices = ("npu",)
    ggml_types = AFFINE_TYPES  # consumed without dequantizing; others are dequantized

    def __init__(self, module: nn.Module, device="npu", compute_dtype: str = "float16", **kwargs):
        require_torch_npu_for(device)  # torch.device("npu") parses only once torch_npu is imported
        super().__init__(module, device, **kwargs)
        self.in_features = module.in_features
        self.out_features = module.out_features
        self.compute_dtype = parse_compute_dtype(self.name, compute_dtype)
        self.matrix: NPUQuantMatrix | None = None
        self.bias: torch.Tensor | None = None
        self.kernels = None  # None: the vendor kernels of ``device``; tests pass reference kernels

    @classmethod
    def available(cls, device=None) -> str | None:
        return npu_unavailable_reason(device)

    def load(self, weights: Mapping) -> None:
        weight = weights["weight"]
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{self.name}: {weight.name} has shape {tuple(weight.shape)}, expected {(self.out_features, self.in_features)}")
        self.matrix = NPUQuantMatrix(weight, self.device, self.compute_dtype, self.kernels)
        bias = weights.get("bias")
        self.bias = None if bias is None else bias.dequantize(dtype=self.compute_dtype, device=self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matrix is None:
            raise RuntimeError(f"{self.name}: forward() before load()")
        y = self.matrix.matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
