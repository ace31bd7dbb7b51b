"""kt-rocm's backends of ``KLinearGPU`` and ``KExpertsGPU``: kt-cuda's Triton ops with ROCm availability
and HIP launch configurations.

Only the launch settings differ (``int4_config``, ``moe_launch``: kt-cuda's ops autotune over candidates
from H200 sweeps); loading, repacking, layouts, forward and the dense fallbacks are kt-cuda's.
"""

from __future__ import annotations

from kt_cuda.ops import KExpertsGPU, KLinearMarlin

from ._env import rocm_unavailable_reason
from .hip_configs import HIP_MOE_LAUNCH, hip_int4_config


class KLinearROCm(KLinearMarlin):
    """``KLinearMarlin`` on an AMD GPU (same options and formats): int4 Triton GEMV/GEMM, HIP tiles."""

    aliases = ("KLinearROCm",)  # its name before ops had backends

    @classmethod
    def available(cls, device=None) -> str | None:
        return rocm_unavailable_reason(device)

    def int4_config(self, rows: int):
        return hip_int4_config(rows, self.weight_int4.group_size)


class KExpertsROCm(KExpertsGPU):
    """``KExpertsGPU`` on an AMD GPU (same options and formats): Triton grouped GEMM, HIP launches."""

    aliases = ("KExpertsROCm",)
    moe_launch = HIP_MOE_LAUNCH

    @classmethod
    def available(cls, device=None) -> str | None:
        return rocm_unavailable_reason(device)
