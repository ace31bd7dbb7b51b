"""``KExpertsXPU``: routed MoE experts through torch's XPU int4 GEMM, one expert at a time."""

from __future__ import annotations

from ktcore.sdk import INT4_TYPES, KExpertsByMatrix

from ._env import xpu_unavailable_reason
from .quant_matrix import XPUQuantMatrix


class KExpertsXPU(KExpertsByMatrix):
    """``sum_k w_k * down_k(act(gate_k(x)) * up_k(x))`` with every projection a weight-quantized matmul
    (same formats as ``KLinearXPU``). Experts that receive no token cost nothing. Options:
    ``compute_dtype`` (``float16`` default, or ``bfloat16``). ``kernels`` None: torch's XPU kernels when
    present; tests pass reference kernels."""

    name = "KExpertsGPU"
    aliases = ("KExpertsXPU",)
    devices = ("xpu",)
    ggml_types = INT4_TYPES
    matrix_type = XPUQuantMatrix

    @classmethod
    def available(cls, device=None) -> str | None:
        return xpu_unavailable_reason(device)
