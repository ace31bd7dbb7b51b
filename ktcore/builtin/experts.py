"""``KExpertsTorch``: the routed experts of one MoE layer, tokens grouped by expert, in plain torch."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F

from ..ops import ANY_DEVICE, Op
from ._common import check_shape, module_dtype, parse_dtype


def gated_experts_dims(op_name: str, module: torch.nn.Module) -> tuple[int, int, int]:
    """``(num_experts, hidden_dim, intermediate_dim)`` of a fused experts module, after checking it is the
    form the experts ops compute: gated, without biases, weights ``[E, out, in]`` (not transposed)."""
    for flag, wanted in (("has_gate", True), ("has_bias", False), ("is_transposed", False)):
        if getattr(module, flag, wanted) != wanted:
            raise ValueError(f"{op_name}: {type(module).__name__} has {flag}={not wanted}, which it does not support")
    return module.num_experts, module.hidden_dim, module.intermediate_dim


def check_expert_weights(op_name: str, weights: Mapping, num_experts: int, hidden_dim: int, intermediate_dim: int) -> None:
    """``weights`` holds ``gate_proj``/``up_proj`` ``[E, I, H]`` and ``down_proj`` ``[E, H, I]``; errors name the op and tensor."""
    E, H, I = num_experts, hidden_dim, intermediate_dim
    for name, shape in (("gate_proj", (E, I, H)), ("up_proj", (E, I, H)), ("down_proj", (E, H, I))):
        if name not in weights:
            raise KeyError(f"{op_name}: no '{name}' tensor given (got {sorted(weights)})")
        check_shape(op_name, weights[name], shape)


def route_by_expert(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The router's (token, slot) choices grouped by expert: ``(expert, tokens, weights)`` for each expert
    in ``[0, num_experts)`` chosen at least once, experts ascending and tokens ascending within one, where
    ``weights[i]`` is the routing weight token ``tokens[i]`` gave ``expert``. An index outside the range
    (Transformers' marker of an expert held elsewhere) is skipped."""
    top_k = top_k_index.shape[-1]
    experts = top_k_index.reshape(-1)
    slot_weights = top_k_weights.reshape(-1)
    pairs = torch.arange(experts.numel(), device=experts.device)
    valid = (experts >= 0) & (experts < num_experts)
    if not bool(valid.all()):
        experts, slot_weights, pairs = experts[valid], slot_weights[valid], pairs[valid]
    order = torch.argsort(experts, stable=True)
    token_of = (pairs // top_k)[order]
    slot_weights = slot_weights[order]
    start = 0
    for expert, count in enumerate(torch.bincount(experts, minlength=num_experts).tolist()):
        if count:
            yield expert, token_of[start : start + count], slot_weights[start : start + count]
            start += count


def expert_slices(qt: "QuantizedTensor") -> list["QuantizedTensor"]:  # noqa: F821
    """A ``[E, ...]`` quantized tensor as E tensors over its raw bytes (experts are whole blocks each)."""
    from ..weights.tensor import QuantizedTensor

    experts = qt.shape[0]
    if qt.data.numel() % experts:
        raise ValueError(f"{qt.name}: {qt.data.numel()} bytes do not split into {experts} experts")
    step = qt.data.numel() // experts
    return [
        QuantizedTensor(f"{qt.name}[{e}]", qt.ggml_type, tuple(qt.shape[1:]), qt.data[e * step : (e + 1) * step], qt.source,
                        None if qt.scale is None else qt.scale[e])
        for e in range(experts)
    ]


def select_experts(qt: "QuantizedTensor", experts: list[int], data: torch.Tensor | None = None) -> "QuantizedTensor":  # noqa: F821
    """The experts ``experts`` (in that order) of an ``[E, ...]`` quantized tensor as an ``[n, ...]`` one.
    ``data``: the bytes to slice instead of ``qt.data`` (a copy of them on another device or in pinned
    memory); the result's bytes are a new tensor on that tensor's device, or a view for all experts in order."""
    from ..weights.tensor import QuantizedTensor

    raw = qt.data if data is None else data
    count = qt.shape[0]
    if raw.numel() % count:
        raise ValueError(f"{qt.name}: {raw.numel()} bytes do not split into {count} experts")
    bad = [e for e in experts if not 0 <= e < count]
    if bad:
        raise ValueError(f"{qt.name}: expert(s) {bad} outside 0..{count - 1}")
    scale = qt.scale
    if list(experts) != list(range(count)):
        per = raw.reshape(count, raw.numel() // count)
        raw = per[torch.as_tensor(list(experts), dtype=torch.long, device=raw.device)].reshape(-1)
        if scale is not None:  # FP8 block scales ([E, nb, kb]) follow their experts
            scale = scale[torch.as_tensor(list(experts), dtype=torch.long, device=scale.device)]
    return QuantizedTensor(qt.name, qt.ggml_type, (len(experts), *qt.shape[1:]), raw, qt.source, scale)


def split_experts(op_name: str, weights: Mapping, projections: tuple[str, ...]) -> list[dict]:
    """``weights`` (each projection ``[E, ...]``) as E dicts ``{projection: that expert's QuantizedTensor}``."""
    missing = [p for p in projections if p not in weights]
    if missing:
        raise KeyError(f"{op_name}: load() needs {', '.join(projections)}; missing {', '.join(missing)}")
    counts = {p: weights[p].shape[0] for p in projections}
    if len(set(counts.values())) != 1:
        raise ValueError(f"{op_name}: projections disagree on the number of experts: {counts}")
    per_projection = {p: expert_slices(weights[p]) for p in projections}
    return [{p: per_projection[p][e] for p in projections} for e in range(counts[projections[0]])]


class KExpertsTorch(Op):
    """``sum_k w_k * down_k(act(gate_k(x)) * up_k(x))`` over a fused experts module's weights.

    The (token, slot) pairs are sorted by expert so each expert runs one matmul over all its tokens;
    experts nobody chose are skipped, and an index outside ``[0, num_experts)`` (Transformers' marker of
    an expert held elsewhere) contributes nothing. Options: ``dtype`` (weights and compute; default: the
    model's dtype). Weighted sums are formed in the routing weights' dtype and accumulated in the input's.
    """

    name = "KExpertsTorch"
    role = "experts"
    devices = ANY_DEVICE

    def __init__(self, module: torch.nn.Module, device="cpu", dtype=None, **kwargs):
        super().__init__(module, device, **kwargs)
        self.num_experts, self.hidden_dim, self.intermediate_dim = gated_experts_dims(self.name, module)
        self.act_fn = module.act_fn
        self.dtype = parse_dtype(dtype, self.name) or module_dtype(module)
        self.register_buffer("gate_up_proj", None, persistent=False)  # [E, 2I, H]: one matmul for both
        self.register_buffer("down_proj", None, persistent=False)  # [E, H, I]

    def load(self, weights: Mapping[str, "QuantizedTensor"]) -> None:  # noqa: F821
        check_expert_weights(self.name, weights, self.num_experts, self.hidden_dim, self.intermediate_dim)
        gate = weights["gate_proj"].dequantize(self.dtype, self.device)
        up = weights["up_proj"].dequantize(self.dtype, self.device)
        self.gate_up_proj = torch.cat([gate, up], dim=1)
        del gate, up
        self.down_proj = weights["down_proj"].dequantize(self.dtype, self.device)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.down_proj is None:
            raise RuntimeError(f"{self.name}: forward before load()")
        out = torch.zeros_like(hidden_states)
        for expert, tokens, weights in route_by_expert(top_k_index, top_k_weights, self.num_experts):
            gate_up, down = self.matrices(expert)
            gate, up = F.linear(hidden_states[tokens].to(self.dtype), gate_up).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, down)
            out.index_add_(0, tokens, (y * weights[:, None]).to(out.dtype))
        return out

    def matrices(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``expert``'s ``gate_up [2I, H]`` and ``down [H, I]`` in the compute dtype."""
        return self.gate_up_proj[expert], self.down_proj[expert]

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, dtype={self.dtype}")
