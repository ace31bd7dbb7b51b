"""``KLinearAscend``: an ``nn.Linear`` through ``npu_weight_quant_batchmatmul``."""

from __future__ import annotations

from torch import nn

from ktcore.sdk import AFFINE_TYPES, KLinearByMatrix

from ._env import npu_unavailable_reason, require_torch_npu_for
from .quant_matrix import NPUQuantMatrix


class KLinearAscend(KLinearByMatrix):
    """Weight-only-quantized linear on an Ascend NPU.

    Q4_0/Q4_1/Q4_K run as int4, Q5_0/Q5_1/Q5_K/Q8_0 as int8 (per-32 antiquant scale and offset, exact
    up to the scale/offset rounding to ``compute_dtype``); any other type is dequantized to
    ``compute_dtype`` and runs as a dense matmul. Options: ``compute_dtype`` (``float16``, the default,
    which every Atlas product takes, or ``bfloat16``).
    """

    name = "KLinearGPU"
    aliases = ("KLinearAscend",)  # its name before ops had backends
    devices = ("npu",)
    matrix_type = NPUQuantMatrix
    ggml_types = AFFINE_TYPES  # consumed without dequantizing; others are dequantized

    def __init__(self, module: nn.Module, device="npu", compute_dtype: str = "float16", **kwargs):
        require_torch_npu_for(device)  # torch.device("npu") parses only once torch_npu is imported
        super().__init__(module, device, compute_dtype, **kwargs)

    @classmethod
    def available(cls, device=None) -> str | None:
        return npu_unavailable_reason(device)
