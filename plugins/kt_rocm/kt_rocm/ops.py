"""kt-rocm's ops: kt-cuda's Triton ops with ROCm availability and HIP launch configurations, and
ktcore's SDPA attention under a ROCm name.

``forward`` is restated here only to pass the HIP configurations (kt-cuda's ops autotune over candidates
from H200 sweeps); loading, repacking, layouts and the dense fallbacks are kt-cuda's.
"""

from __future__ import annotations

import torch

from kt_cuda.ops import KExpertsGPU, KLinearMarlin
from ktcore.builtin import KAttentionSDPA

from ._env import rocm_unavailable_reason
from .hip_configs import HIP_MOE_LAUNCH, hip_int4_config

HALF = (torch.float16, torch.bfloat16)


class KLinearROCm(KLinearMarlin):
    """``KLinearMarlin`` on an AMD GPU (same options and formats): int4 Triton GEMV/GEMM, HIP tiles."""

    name = "KLinearROCm"

    @classmethod
    def available(cls, device=None) -> str | None:
        return rocm_unavailable_reason(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_int4 is None:
            return super().forward(x)  # dense fallback: a torch matmul (hipBLASLt)
        from kt_cuda.triton_int4 import int4_matmul

        x2 = x.reshape(-1, self.in_features)
        compute = x2.dtype if x2.dtype in HALF else (self.dtype if self.dtype in HALF else torch.bfloat16)
        config = hip_int4_config(x2.shape[0], self.weight_int4.group_size)
        y = int4_matmul(x2.to(compute), self.weight_int4, self.bias, config)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class KExpertsROCm(KExpertsGPU):
    """``KExpertsGPU`` on an AMD GPU (same options and formats): Triton grouped GEMM, HIP launches."""

    name = "KExpertsROCm"

    @classmethod
    def available(cls, device=None) -> str | None:
        return rocm_unavailable_reason(device)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.down is None:
            raise RuntimeError(f"{self.name}: forward before load()")
        from kt_cuda.triton_int4 import align_pairs, moe_matmul

        tokens, top_k = top_k_index.shape
        pairs = tokens * top_k
        E, I = self.num_experts, self.intermediate_dim
        valid = (top_k_index >= 0) & (top_k_index < E)
        index = torch.where(valid, top_k_index, 0)
        slot_weights = torch.where(valid, top_k_weights, torch.zeros((), dtype=top_k_weights.dtype, device=top_k_weights.device))
        block_m = self.block_m or (16 if pairs <= 2048 else 64)
        pair_ids, block_expert = align_pairs(index, E, block_m)
        x = hidden_states.to(self.dtype)
        gate_up = moe_matmul(x, self.gate_up, pair_ids, block_expert, pairs, top_k, block_m, **HIP_MOE_LAUNCH)
        h = self.act_fn(gate_up[:, :I]) * gate_up[:, I:]
        y = moe_matmul(h, self.down, pair_ids, block_expert, pairs, 1, block_m, **HIP_MOE_LAUNCH)
        out = (y.view(tokens, top_k, -1).float() * slot_weights.unsqueeze(-1).float()).sum(dim=1)
        return out.to(hidden_states.dtype)


class KAttentionROCm(KAttentionSDPA):
    """ktcore's SDPA attention on an AMD GPU (ROCm torch runs ``scaled_dot_product_attention`` on its
    AOTriton / composable-kernel flash attention)."""

    name = "KAttentionROCm"
    devices = ("cuda",)

    @classmethod
    def available(cls, device=None) -> str | None:
        return rocm_unavailable_reason(device)
