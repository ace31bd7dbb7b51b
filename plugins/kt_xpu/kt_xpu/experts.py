"""``KExpertsXPU``: routed MoE experts through torch's XPU int4 GEMM, one expert at a time."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ktcore.ops import Op
from ktcore.weights.affine import INT4_TYPES, compute_dtype as parse_compute_dtype

from ._env import xpu_unavailable_reason
from .quant_matrix import XPUQuantMatrix, expert_slices


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
        missing = [p for p in self.PROJECTIONS if p not in weights]
        if missing:
            raise KeyError(f"{self.name}: load() needs {', '.join(self.PROJECTIONS)}; missing {', '.join(missing)}")
        counts = {p: weights[p].shape[0] for p in self.PROJECTIONS}
        if len(set(counts.values())) != 1:
            raise ValueError(f"{self.name}: projections disagree on the number of experts: {counts}")
        per_expert = {p: expert_slices(weights[p]) for p in self.PROJECTIONS}
        self.experts = [
            {p: XPUQuantMatrix(per_expert[p][e], self.device, self.compute_dtype, self.kernels) for p in self.PROJECTIONS}
            for e in range(counts["gate_proj"])
        ]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if not self.experts:
            raise RuntimeError(f"{self.name}: forward() before load()")
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        # indices outside [0, E) are padding (expert parallelism marks foreign experts that way)
        for expert in torch.unique(top_k_index).tolist():
            if not 0 <= expert < len(self.experts):
                continue
            token, slot = torch.where(top_k_index == expert)
            proj = self.experts[expert]
            x = hidden_states[token]
            h = self.act_fn(proj["gate_proj"].matmul(x)) * proj["up_proj"].matmul(x)
            y = proj["down_proj"].matmul(h).float() * top_k_weights[token, slot, None].float()
            out.index_add_(0, token, y)
        return out.to(hidden_states.dtype)
