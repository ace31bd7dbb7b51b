"""``KExpertsAscend``: routed MoE experts through ``npu_weight_quant_batchmatmul``, one expert at a time."""

from __future__ import annotations

from torch import nn

from ktcore.sdk import AFFINE_TYPES, KExpertsByMatrix

from ._env import npu_unavailable_reason, require_torch_npu_for
from .quant_matrix import NPUQuantMatrix


class KExpertsAscend(KExpertsByMatrix):
    """``sum_k w_k * down_k(act(gate_k(x)) * up_k(x))`` with every projection a weight-quantized matmul
    (same formats as ``KLinearAscend``). Experts that receive no token cost nothing. Options:
    ``compute_dtype`` (``float16`` default, or ``bfloat16``). ``kernels`` None: the vendor kernels of
    ``device``; tests pass reference kernels."""

    name = "KExpertsGPU"
    aliases = ("KExpertsAscend",)
    devices = ("npu",)
    ggml_types = AFFINE_TYPES
    matrix_type = NPUQuantMatrix

    def __init__(self, module: nn.Module, device="npu", compute_dtype: str = "float16", **kwargs):
        require_torch_npu_for(device)  # torch.device("npu") parses only once torch_npu is imported
        super().__init__(module, device, compute_dtype, **kwargs)

    @classmethod
    def available(cls, device=None) -> str | None:
        return npu_unavailable_reason(device)
