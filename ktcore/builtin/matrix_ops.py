"""Bases of vendor ops that run every weight as one quantized-matrix object (a plugin's own class, built
``matrix_type(qt, device, compute_dtype, kernels)`` and offering ``matmul(x[M, K]) -> [M, N]``): the
linear and the routed experts around such matrices are the same whatever the accelerator.

A subclass sets ``name``, ``devices``, ``ggml_types``, ``matrix_type`` and ``available``. ``kernels`` is
handed to every matrix: ``None`` lets the matrix pick the device's kernels; tests set reference kernels
before ``load``. Option: ``compute_dtype`` (``float16``, the default, or ``bfloat16``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..ops import Op
from ..weights.affine import compute_dtype as parse_compute_dtype
from .experts import route_by_expert, split_experts


class KLinearByMatrix(Op):
    """``y = x W^T (+ b)`` with ``W`` one ``matrix_type``; the bias is kept dense in ``compute_dtype``."""

    role = "linear"
    matrix_type: ClassVar[Any] = None

    def __init__(self, module: nn.Module, device=None, compute_dtype: str = "float16", **kwargs):
        super().__init__(module, self.devices[0] if device is None else device, **kwargs)
        self.in_features = module.in_features
        self.out_features = module.out_features
        self.compute_dtype = parse_compute_dtype(self.name, compute_dtype)
        self.matrix = None
        self.bias: torch.Tensor | None = None
        self.kernels = None

    def load(self, weights: Mapping) -> None:
        weight = weights["weight"]
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{self.name}: {weight.name} has shape {tuple(weight.shape)}, expected {(self.out_features, self.in_features)}")
        self.matrix = self.matrix_type(weight, self.device, self.compute_dtype, self.kernels)
        bias = weights.get("bias")
        self.bias = None if bias is None else bias.dequantize(dtype=self.compute_dtype, device=self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matrix is None:
            raise RuntimeError(f"{self.name}: forward() before load()")
        y = self.matrix.matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class KExpertsByMatrix(Op):
    """``sum_k w_k * down_k(act(gate_k(x)) * up_k(x))`` with every projection of every expert one
    ``matrix_type``, one expert at a time; experts that receive no token cost nothing. Sums in float32."""

    role = "experts"
    matrix_type: ClassVar[Any] = None
    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, module: nn.Module, device=None, compute_dtype: str = "float16", **kwargs):
        super().__init__(module, self.devices[0] if device is None else device, **kwargs)
        self.act_fn = module.act_fn
        self.compute_dtype = parse_compute_dtype(self.name, compute_dtype)
        self.experts: list[dict] = []
        self.kernels = None

    def load(self, weights: Mapping) -> None:
        self.experts = [
            {p: self.matrix_type(qt, self.device, self.compute_dtype, self.kernels) for p, qt in expert.items()}
            for expert in split_experts(self.name, weights, self.PROJECTIONS)
        ]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if not self.experts:
            raise RuntimeError(f"{self.name}: forward() before load()")
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        for expert, tokens, weights in route_by_expert(top_k_index, top_k_weights, len(self.experts)):
            proj = self.experts[expert]
            x = hidden_states[tokens]
            h = self.act_fn(proj["gate_proj"].matmul(x)) * proj["up_proj"].matmul(x)
            y = proj["down_proj"].matmul(h).float() * weights[:, None].float()
            out.index_add_(0, tokens, y)
        return out.to(hidden_states.dtype)
