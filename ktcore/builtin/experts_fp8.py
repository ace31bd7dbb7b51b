"""``KExpertsFP8``: routed experts from a native FP8 checkpoint's values (e4m3, 128x128 block scales), in torch.

``keep`` (rule option) says what stays in memory:

- ``bf16`` (default, the faster by ``bench/bench_fp8_experts.py``): each weight converted once at load,
  ``bfloat16(float32(q) * scale)``, 2 bytes per weight. Bit for bit ``dequantize(qt, torch.bfloat16)``: one
  rounding of the float32 product (relative error at most 2**-9 against it), so a float32 model's experts
  compute on weights that float32 dequantization would give only where the product fits bfloat16.
- ``fp8``: the checkpoint's bytes and block scales, 1 + 4/128**2 bytes per weight; each call converts the
  chosen experts' matrices to the compute dtype, ``float32(q) * scale`` then the dtype: the values of
  ``dequantize(qt, dtype)`` exactly, so a float32 model computes on the float32 reference weights.

``dtype``: the compute dtype (default: the model's). Weights of other types are dequantized to it at load
(as ``KExpertsTorch`` does).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..weights import fp8
from .experts import KExpertsTorch, check_expert_weights

KEEP = ("bf16", "fp8")


class KExpertsFP8(KExpertsTorch):
    name = "KExpertsFP8"

    def __init__(self, module: torch.nn.Module, device="cpu", dtype=None, keep: str = "bf16", **kwargs):
        super().__init__(module, device, dtype, **kwargs)
        if keep not in KEEP:
            raise ValueError(f"{self.name}: keep {keep!r} is not one of {', '.join(KEEP)}")
        self.keep = keep
        self.fp8_weights = None  # keep fp8: (gate_up q [E, 2I, H], gate scales, up scales, down q, down scales)

    def load(self, weights: Mapping[str, "QuantizedTensor"]) -> None:  # noqa: F821
        check_expert_weights(self.name, weights, self.num_experts, self.hidden_dim, self.intermediate_dim)
        parts = [weights[p] for p in ("gate_proj", "up_proj", "down_proj")]
        if any(qt.ggml_type != fp8.FP8_TYPE for qt in parts):
            return super().load(weights)
        if self.keep == "bf16":
            gate, up, down = (qt.dequantize(torch.bfloat16, self.device) for qt in parts)
            self.gate_up_proj = torch.cat([gate, up], dim=1)
            self.down_proj = down
            return
        gate, up, down = ((qt.data.to(self.device).view(torch.float8_e4m3fn).reshape(qt.shape), qt.scale.to(self.device))
                          for qt in parts)
        self.fp8_weights = (torch.cat([gate[0], up[0]], dim=1), gate[1], up[1], down[0].clone(), down[1])
        self.down_proj = self.fp8_weights[3]  # marks the op loaded

    def matrices(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fp8_weights is None:
            gate_up, down = self.gate_up_proj[expert], self.down_proj[expert]
            return gate_up.to(self.dtype), down.to(self.dtype)
        gate_up, gate_scale, up_scale, down, down_scale = self.fp8_weights
        inter = self.intermediate_dim
        rows = torch.cat([fp8.row_scales(gate_scale[expert], inter), fp8.row_scales(up_scale[expert], inter)])
        return (fp8.row_scaled_to(gate_up[expert], rows, self.dtype),
                fp8.row_scaled_to(down[expert], fp8.row_scales(down_scale[expert], self.hidden_dim), self.dtype))

    @classmethod
    def estimated_bytes(cls, qt, dtype: torch.dtype, op_kwargs) -> int:
        """The bytes ``qt`` takes once loaded with these options (``ktcore.placement`` asks before loading)."""
        numel = 1
        for n in qt.shape:
            numel *= int(n)
        if qt.ggml_type != fp8.FP8_TYPE:
            return numel * dtype.itemsize
        if op_kwargs.get("keep", "bf16") == "bf16":
            return numel * 2
        return numel + qt.scale.numel() * 4

    def kept_bytes(self) -> int:
        """Bytes of the weights this op keeps."""
        tensors = self.fp8_weights if self.fp8_weights is not None else (self.gate_up_proj, self.down_proj)
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, keep={self.keep}"
