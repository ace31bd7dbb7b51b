"""``KExpertsAscend``: routed MoE experts through ``npu_weight_quant_batchmatmul``, one expert at a time."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ktcore.builtin.experts import route_by_expert, split_experts
from ktcore.ops import Op
from ktcore.weights.affine import AFFINE_TYPES, compute_dtype as parse_compute_dtype

from ._env import npu_unavailable_reason, require_torch_npu_for
from .quant_matrix import NPUQuantMatrix


class KExpertsAscend(Op):
    """``sum_k w_k * down_k(act(gate_k(x)) * up_k(x))`` with every projection a weight-quantized matmul
    (same formats as ``KLinearAscend``). Experts that receive no token cost nothing. Options:
    ``compute_dtype`` (``float16`` default, or ``bfloat16``)."""

    name = "KExpertsAscend"
    role = "experts"
    devices = ("npu",)
    ggml_types = AFFINE_TYPES

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, module: nn.Module, device="npu", compute_dtype: str = "float16", **kwargs):
        require_torch_npu_for(device)  # torch.device("npu") parses only once torch_npu is imported
        super().__init__(module, device, **kwargs)
        self.act_fn = module.act_fn
        self.compute_dtype = parse_compute_dtype(self.name, compute_dtype)
        self.experts: list[dict[str, NPUQuantMatrix]] = []
        self.kernels = None  # None: the vendor kernels of ``device``; tests pass reference kernels

    @classmethod
    def available(cls, device=None) -> str | None:
        return npu_unavailable_reason(device)

    def load(self, weights: Mapping) -> None:
        self.experts = [
            {p: NPUQuantMatrix(qt, self.device, self.compute_dtype, self.kernels) for p, qt in expert.items()}
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
