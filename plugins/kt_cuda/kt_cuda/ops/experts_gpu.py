"""``KExpertsGPU``: routed experts on the GPU, one grouped GEMM per projection over pairs sorted by expert."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ktcore.sdk import Op, check_expert_weights, gated_experts_dims

from .. import int4
from .._env import cuda_unavailable_reason
from ..ggml_blocks import INT4_TYPES
from ._common import module_dtype, parse_dtype, parse_layout, parse_scales_dtype, tensor_label


class KExpertsGPU(Op):
    """``sum_k w_k * down_k(act(gate_k(x)) * up_k(x))`` with Triton grouped GEMMs.

    The (token, slot) pairs are sorted by expert and padded to whole row blocks per expert; each
    program multiplies one block of rows by one expert's weight tile. Gate and up run as one GEMM over
    their concatenation. Q4_0 / Q4_1 / Q4_K weights stay int4 (the ``KLinearMarlin`` layout); other
    types are dequantized to ``dtype``. An index outside ``[0, num_experts)`` contributes nothing.

    Options: ``dtype`` (activations and dequantized weights; default the model's dtype, float32 models
    run in bfloat16), ``scales_dtype`` (as ``KLinearMarlin``), ``block_m`` (rows per block; default by
    the number of pairs), ``layout`` (``n_major`` or ``k_major`` packed bytes).
    """

    name = "KExpertsGPU"
    graph_capturable = True
    role = "experts"
    devices = ("cuda",)
    ggml_types = None
    # extra launch settings for the grouped GEMM (num_warps, stages, ...); a vendor subclass sets its own
    moe_launch: dict = {}
    repacked_types = INT4_TYPES

    def __init__(self, module: torch.nn.Module, device="cuda", dtype=None, scales_dtype="auto", block_m=None,
                 layout: str = "n_major", **kwargs):
        super().__init__(module, device, **kwargs)
        self.num_experts, self.hidden_dim, self.intermediate_dim = gated_experts_dims(self.name, module)
        self.act_fn = module.act_fn
        dtype = parse_dtype(dtype, self.name) or module_dtype(module)
        self.dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        self.scales_dtype = parse_scales_dtype(scales_dtype, self.name)
        self.block_m = block_m
        self.k_major = parse_layout(layout, self.name)
        self.gate_up = None  # Int4Weight or tensor [E, 2I, H]
        self.down = None  # Int4Weight or tensor [E, H, I]

    @classmethod
    def available(cls, device=None) -> str | None:
        return cuda_unavailable_reason(device)

    def _weight(self, qt):
        if qt.ggml_type in INT4_TYPES:
            return int4.from_ggml(qt.data.to(self.device), qt.ggml_type, qt.shape, self.scales_dtype, name=tensor_label(qt))
        return qt.dequantize(self.dtype, self.device)

    def load(self, weights: Mapping[str, "QuantizedTensor"]) -> None:  # noqa: F821
        check_expert_weights(self.name, weights, self.num_experts, self.hidden_dim, self.intermediate_dim)
        gate, up = self._weight(weights["gate_proj"]), self._weight(weights["up_proj"])
        if isinstance(gate, int4.Int4Weight) and isinstance(up, int4.Int4Weight):
            self.gate_up = int4.with_layout(int4.concat([gate, up], dim=-2), self.k_major)
        else:
            dense = [w.dequantize(self.dtype) if isinstance(w, int4.Int4Weight) else w for w in (gate, up)]
            self.gate_up = torch.cat(dense, dim=1)
        del gate, up
        down = self._weight(weights["down_proj"])
        self.down = int4.with_layout(down, self.k_major) if isinstance(down, int4.Int4Weight) else down

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.down is None:
            raise RuntimeError(f"{self.name}: forward before load()")
        from ..triton_int4 import align_pairs, moe_matmul

        tokens, top_k = top_k_index.shape
        pairs = tokens * top_k
        E, I = self.num_experts, self.intermediate_dim
        valid = (top_k_index >= 0) & (top_k_index < E)
        index = torch.where(valid, top_k_index, 0)
        slot_weights = torch.where(valid, top_k_weights, torch.zeros((), dtype=top_k_weights.dtype, device=top_k_weights.device))
        block_m = self.block_m or (16 if pairs <= 2048 else 64)
        pair_ids, block_expert = align_pairs(index, E, block_m)
        x = hidden_states.to(self.dtype)
        gate_up = moe_matmul(x, self.gate_up, pair_ids, block_expert, pairs, top_k, block_m, **self.moe_launch)
        h = self.act_fn(gate_up[:, :I]) * gate_up[:, I:]
        y = moe_matmul(h, self.down, pair_ids, block_expert, pairs, 1, block_m, **self.moe_launch)
        out = (y.view(tokens, top_k, -1).float() * slot_weights.unsqueeze(-1).float()).sum(dim=1)
        return out.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        fmt = lambda w: "int4" if isinstance(w, int4.Int4Weight) else str(self.dtype)  # noqa: E731
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}, "
                f"gate_up={fmt(self.gate_up)}, down={fmt(self.down)}")
