"""``KExpertsGptOssCPU``: GPT-OSS's routed experts (biases on every projection, clamped SwiGLU) with the weights
kept as stored (MXFP4 as its GGUF blocks, decoded by the kernels as they compute: memory = the file's bytes).

The three projections of each expert run as the kernels' linear (per expert, on the tokens routed to it),
always with the activations' int8 rounding residual (``Runtime.act_residual``: two int8 rows per token), so the
output is the float product of the stored weights to about 1e-5; biases and the activation in torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ktcore.sdk import GptOssExpertsOp, route_by_expert

from . import repack
from .runtime import get_runtime


class KExpertsGptOssCPU(GptOssExpertsOp):
    """``sum_k w_k * (down_k((clamp(up) + 1) * glu(clamp(gate))) + b_down)``, ``glu(g) = g * sigmoid(alpha g)``
    (GPT-OSS's ``GptOssExperts``, as ``KExpertsGptOssTorch``). Loads ``gate_proj``/``up_proj`` ``[E, I, H]``,
    ``down_proj_stored`` ``[E, H, I]`` (llama.cpp's layout, see ``WeightSource``) and the biases. Options as
    ``KExpertsCPU``."""

    name = "KExpertsGptOssCPU"
    role = "experts"
    devices = ("cpu",)
    ggml_types = repack.STORED_TYPES
    stored_down_proj = True  # KExperts hands over down_proj_stored, not the transposed (dequantized) down_proj

    def __init__(self, module: torch.nn.Module, device="cpu", threads=None, isa=None, online_quant="int8", **kwargs):
        super().__init__(module, device, **kwargs)
        self.threads, self.isa = threads, isa
        self.float_bits = repack.online_bits(online_quant)
        self.matrices = None  # name -> [PackedMatrix per expert]
        self.biases = {}

    @classmethod
    def available(cls, device=None) -> str | None:
        from .ops import _cpu_reason

        return _cpu_reason(cls.name, device)

    def load(self, weights: Mapping[str, "QuantizedTensor"]) -> None:  # noqa: F821
        self.check_weights(weights, down="down_proj_stored")
        mats = ("gate_proj", "up_proj", "down_proj_stored")
        runtime = get_runtime(self.threads, self.isa)
        self.matrices = {n: repack.pack_matrices(weights[n], self.float_bits, runtime) for n in mats}
        self.biases = {n: repack.to_float32(weights[n + "_bias"] if n != "down_proj_stored" else weights["down_proj_bias"]).clone()
                       for n in mats}
        self.ggml_types_loaded = {n: weights[n].ggml_type for n in mats}

    @property
    def nbytes(self) -> int:
        """Bytes of the kept weight matrices (the GGUF blocks for a block type)."""
        return sum(pm.nbytes for mats in (self.matrices or {}).values() for pm in mats)

    def _linear(self, rt, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        pm = self.matrices[name][expert]
        y = torch.empty(x.shape[0], pm.n, dtype=torch.float32)
        rt.linear(pm, x.shape[0], x.data_ptr(), y.data_ptr(), True)
        return y.add_(self.biases[name][expert])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.matrices is None:
            raise RuntimeError(f"{self.name}: forward before load()")
        rt = get_runtime(self.threads, self.isa)
        x = hidden_states.to(device="cpu", dtype=torch.float32).contiguous()
        out = torch.zeros_like(x)
        for expert, tokens, weights in route_by_expert(top_k_index.cpu(), top_k_weights.cpu(), self.num_experts):
            xe = x[tokens].contiguous()
            gate = self._linear(rt, "gate_proj", expert, xe).clamp_(max=self.limit)
            up = self._linear(rt, "up_proj", expert, xe).clamp_(min=-self.limit, max=self.limit)
            h = ((up + 1) * (gate * torch.sigmoid(gate * self.alpha))).contiguous()
            y = self._linear(rt, "down_proj_stored", expert, h)
            out.index_add_(0, tokens, y * weights.to(torch.float32)[:, None])
        return out.to(device=hidden_states.device, dtype=hidden_states.dtype)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}, "
                f"types={getattr(self, 'ggml_types_loaded', None)}")
