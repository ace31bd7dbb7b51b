"""``KLinearXPU``: an ``nn.Linear`` through torch's XPU int4 weight-only GEMM."""

from __future__ import annotations

from ktcore.sdk import INT4_TYPES, KLinearByMatrix

from ._env import xpu_unavailable_reason
from .quant_matrix import XPUQuantMatrix


class KLinearXPU(KLinearByMatrix):
    """Weight-only int4 linear on an Intel GPU: Q4_0/Q4_1/Q4_K repacked exactly (scale per 32 weights,
    the per-group min added as a group-sum product); any other type, or a torch without the XPU int4
    kernels, runs as a dense matmul of the dequantized weight. Options: ``compute_dtype`` (``float16``,
    the default, or ``bfloat16``)."""

    name = "KLinearGPU"
    aliases = ("KLinearXPU",)  # its name before ops had backends
    devices = ("xpu",)
    matrix_type = XPUQuantMatrix
    ggml_types = INT4_TYPES

    @classmethod
    def available(cls, device=None) -> str | None:
        return xpu_unavailable_reason(device)
