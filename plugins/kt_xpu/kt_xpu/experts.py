"""``KExpertsXPU``: routed MoE experts through torch's XPU int4 GEMM, one expert at a time."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ktcore.builtin.experts import route_by_expert, split_experts
from ktcore.ops import Op
from ktcore.weights.affine import INT4_TYPES, compute_dtype as parse_compute_dtype

from ._env import xpu_unavailable_reason
from .quant_matrix import XPUQuantMatrix


class KExpertsXPU(Op):
    """``sum_k w_k * down_k(act(gate_k(x)) * up_k(x))`` with every projection a weight-quantized matmul
    (same formats as ``KLinearXPU``). Experts that receive no token cost nothing. Options:
    ``compute_dtype`` (``float16`` default, or ``bfloat16``)."""

    name = "KExpertsXPU"
    role = "experts"
    devices = ("xpu",)
    ggml_types = INT4_TYPES

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, module: nn.Module, device="xpu", compute_dtype: str = "float16", **kwargs):
        super().__init__(module, device, **kwargs)
        self.act_fn = module.act_fn
        self.compute_dtype = parse_compute_dtype(self.name, compute_dtype)
        self.experts: list[dict[str, XPUQuantMatrix]] = []
        self.kernels = None  # None: torch's XPU kernels when present; tests pass reference kernels

    @classmethod
    def available(cls, device=None) -> str | None:
        return xpu_unavailable_reason(device)

    def load(self, weights: Mapping) -> None:
        self.experts = [
            {p: XPUQuantMatrix(qt, self.device, self.compute_dtype, self.kernels) for p, qt in expert.items()}
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
