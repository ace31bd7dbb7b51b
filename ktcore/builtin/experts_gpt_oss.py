"""``KExpertsGptOssTorch``: GPT-OSS's routed experts (biases on every projection, clamped SwiGLU), in plain torch."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..ops import ANY_DEVICE, Op
from ._common import check_shape, module_dtype, parse_dtype
from .experts import route_by_expert


class GptOssExpertsOp(Op):
    """What every backend of GPT-OSS's experts shares: the module's facts (``num_experts``, ``hidden_dim``,
    ``intermediate_dim``, the SwiGLU's ``alpha`` and ``limit``) and the check of the tensors ``load`` gets."""

    def __init__(self, module: torch.nn.Module, device="cpu", **kwargs):
        super().__init__(module, device, **kwargs)
        for attr in ("gate_up_proj_bias", "down_proj_bias", "alpha", "limit"):
            if getattr(module, attr, None) is None:
                raise ValueError(f"{self.name}: {type(module).__name__} has no {attr}; it is not GPT-OSS's experts module")
        self.num_experts, self.hidden_dim, self.intermediate_dim = module.num_experts, module.hidden_size, module.intermediate_size
        self.alpha, self.limit = float(module.alpha), float(module.limit)

    def check_weights(self, weights: Mapping[str, "QuantizedTensor"], down: str = "down_proj") -> None:  # noqa: F821
        """``down``: ``down_proj`` (``[E, I, H]``, transposed as Transformers holds it) or ``down_proj_stored``
        (``[E, H, I]``, as the file stores it)."""
        E, H, I = self.num_experts, self.hidden_dim, self.intermediate_dim
        shapes = {"gate_proj": (E, I, H), "up_proj": (E, I, H), down: (E, H, I) if down == "down_proj_stored" else (E, I, H),
                  "gate_proj_bias": (E, I), "up_proj_bias": (E, I), "down_proj_bias": (E, H)}
        for name, shape in shapes.items():
            if name not in weights:
                raise KeyError(f"{self.name}: no '{name}' tensor given (got {sorted(weights)})")
            check_shape(self.name, weights[name], shape)


class KExpertsGptOssTorch(GptOssExpertsOp):
    """``sum_k w_k * (down_k(((clamp(up) + 1) * glu(clamp(gate)))) + b_down)`` with ``glu(g) = g * sigmoid(1.702 g)``,
    ``gate``/``up`` each with their bias: GPT-OSS's ``GptOssExperts``.

    Loads ``gate_proj``/``up_proj`` ``[E, I, H]`` (as llama.cpp stores them), their biases ``[E, I]``,
    ``down_proj`` in Transformers' ``[E, I, H]`` and ``down_proj_bias`` ``[E, H]``; computes in ``dtype``
    (default: the model's), tokens grouped by expert as ``KExpertsTorch`` does.
    """

    name = "KExpertsGptOssTorch"
    role = "experts"
    devices = ANY_DEVICE

    def __init__(self, module: torch.nn.Module, device="cpu", dtype=None, **kwargs):
        super().__init__(module, device, **kwargs)
        self.dtype = parse_dtype(dtype, self.name) or module_dtype(module)
        for name in ("gate_up", "gate_up_bias", "down", "down_bias"):
            self.register_buffer(name, None, persistent=False)

    def load(self, weights: Mapping[str, "QuantizedTensor"]) -> None:  # noqa: F821
        self.check_weights(weights)
        names = ("gate_proj", "up_proj", "down_proj", "gate_proj_bias", "up_proj_bias", "down_proj_bias")
        value = {n: weights[n].dequantize(self.dtype, self.device) for n in names}
        self.gate_up = torch.cat([value["gate_proj"], value["up_proj"]], dim=1)  # [E, 2I, H]: one matmul
        self.gate_up_bias = torch.cat([value["gate_proj_bias"], value["up_proj_bias"]], dim=1)
        self.down = value["down_proj"].transpose(1, 2).contiguous()  # [E, H, I]
        self.down_bias = value["down_proj_bias"]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.down is None:
            raise RuntimeError(f"{self.name}: forward before load()")
        out = torch.zeros_like(hidden_states)
        for expert, tokens, weights in route_by_expert(top_k_index, top_k_weights, self.num_experts):
            x = hidden_states[tokens].to(self.dtype)
            gate, up = F.linear(x, self.gate_up[expert], self.gate_up_bias[expert]).chunk(2, dim=-1)
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            y = F.linear((up + 1) * (gate * torch.sigmoid(gate * self.alpha)), self.down[expert], self.down_bias[expert])
            out.index_add_(0, tokens, (y * weights[:, None]).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}, dtype={self.dtype}"
