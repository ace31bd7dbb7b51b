"""``KExpertsTorch``: the routed experts of one MoE layer, tokens grouped by expert, in plain torch."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..ops import Op
from ._common import TORCH_DEVICES, check_shape, module_dtype, parse_dtype


class KExpertsTorch(Op):
    """``sum_k w_k * down_k(act(gate_k(x)) * up_k(x))`` over a fused experts module's weights.

    The (token, slot) pairs are sorted by expert so each expert runs one matmul over all its tokens;
    experts nobody chose are skipped, and an index outside ``[0, num_experts)`` (Transformers' marker of
    an expert held elsewhere) contributes nothing. Options: ``dtype`` (weights and compute; default: the
    model's dtype). Weighted sums are formed in the routing weights' dtype and accumulated in the input's.
    """

    name = "KExpertsTorch"
    role = "experts"
    devices = TORCH_DEVICES

    def __init__(self, module: torch.nn.Module, device="cpu", dtype=None, **kwargs):
        super().__init__(module, device, **kwargs)
        for flag, wanted in (("has_gate", True), ("has_bias", False), ("is_transposed", False)):
            if getattr(module, flag, wanted) != wanted:
                raise ValueError(f"{self.name}: {type(module).__name__} has {flag}={not wanted}, which it does not support")
        self.num_experts = module.num_experts
        self.hidden_dim = module.hidden_dim
        self.intermediate_dim = module.intermediate_dim
        self.act_fn = module.act_fn
        self.dtype = parse_dtype(dtype, self.name) or module_dtype(module)
        self.register_buffer("gate_up_proj", None, persistent=False)  # [E, 2I, H]: one matmul for both
        self.register_buffer("down_proj", None, persistent=False)  # [E, H, I]

    def load(self, weights: Mapping[str, "QuantizedTensor"]) -> None:  # noqa: F821
        E, H, I = self.num_experts, self.hidden_dim, self.intermediate_dim
        for name, shape in (("gate_proj", (E, I, H)), ("up_proj", (E, I, H)), ("down_proj", (E, H, I))):
            if name not in weights:
                raise KeyError(f"{self.name}: no '{name}' tensor given (got {sorted(weights)})")
            check_shape(self.name, weights[name], shape)
        gate = weights["gate_proj"].dequantize(self.dtype, self.device)
        up = weights["up_proj"].dequantize(self.dtype, self.device)
        self.gate_up_proj = torch.cat([gate, up], dim=1)
        del gate, up
        self.down_proj = weights["down_proj"].dequantize(self.dtype, self.device)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.down_proj is None:
            raise RuntimeError(f"{self.name}: forward before load()")
        tokens, top_k = top_k_index.shape
        out = torch.zeros_like(hidden_states)
        experts = top_k_index.reshape(-1)
        slot_weights = top_k_weights.reshape(-1)
        pairs = torch.arange(experts.numel(), device=experts.device)
        valid = (experts >= 0) & (experts < self.num_experts)
        if not bool(valid.all()):
            experts, slot_weights, pairs = experts[valid], slot_weights[valid], pairs[valid]
        order = torch.argsort(experts, stable=True)
        token_of = (pairs // top_k)[order]
        slot_weights = slot_weights[order]
        counts = torch.bincount(experts, minlength=self.num_experts).tolist()
        x = hidden_states[token_of].to(self.dtype)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            gate, up = F.linear(x[rows], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
            out.index_add_(0, token_of[rows], (y * slot_weights[rows, None]).to(out.dtype))
            start += count
        return out

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, dtype={self.dtype}")
