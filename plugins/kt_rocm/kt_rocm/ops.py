"""kt-rocm's ops: kt-cuda's Triton ops with ROCm availability and HIP launch configurations, and
ktcore's SDPA attention under a ROCm name.

Only the launch settings differ (``int4_config``, ``moe_launch``: kt-cuda's ops autotune over candidates
from H200 sweeps); loading, repacking, layouts, forward and the dense fallbacks are kt-cuda's.
"""

from __future__ import annotations

from kt_cuda.ops import KExpertsGPU, KLinearMarlin
from ktcore.builtin import KAttentionSDPA

from ._env import rocm_unavailable_reason
from .hip_configs import HIP_MOE_LAUNCH, hip_int4_config


class KLinearROCm(KLinearMarlin):
    """``KLinearMarlin`` on an AMD GPU (same options and formats): int4 Triton GEMV/GEMM, HIP tiles."""

    name = "KLinearROCm"

    @classmethod
    def available(cls, device=None) -> str | None:
        return rocm_unavailable_reason(device)

    def int4_config(self, rows: int):
        return hip_int4_config(rows, self.weight_int4.group_size)


class KExpertsROCm(KExpertsGPU):
    """``KExpertsGPU`` on an AMD GPU (same options and formats): Triton grouped GEMM, HIP launches."""

    name = "KExpertsROCm"
    moe_launch = HIP_MOE_LAUNCH

    @classmethod
    def available(cls, device=None) -> str | None:
        return rocm_unavailable_reason(device)


class KAttentionROCm(KAttentionSDPA):
    """ktcore's SDPA attention on an AMD GPU (ROCm torch runs ``scaled_dot_product_attention`` on its
    AOTriton / composable-kernel flash attention)."""

    name = "KAttentionROCm"
    devices = ("cuda",)

    @classmethod
    def available(cls, device=None) -> str | None:
        return rocm_unavailable_reason(device)
