"""The public SDK for backend plugins: everything a plugin's ops may import from ktcore.

A plugin imports from ``ktcore.sdk`` (and ``ktcore.hookspecs`` for ``hookimpl``), never from the core's
other modules; the import-linter contract in ``tests/test_sdk.py`` enforces it for the first-party
plugins. ``ktcore.sdk.testing`` checks a new op against the torch reference.

- the op contract: ``Op``, ``ROLES``, ``ANY_DEVICE``, ``stream_capturing`` (see docs/ARCHITECTURE.md)
- role base classes, the portable torch ops a backend may extend: ``KLinearTorch``, ``KExpertsTorch``,
  ``KAttentionSDPA``, ``KAttentionMLA``, ``KRoPETorch``; and the matrix-op bases ``KLinearByMatrix``,
  ``KExpertsByMatrix`` (linear and experts around a plugin's quantized-matrix class with ``matmul``)
- shape checks and option parsing: ``check_shape``, ``gated_experts_dims``, ``check_expert_weights``,
  ``module_dtype``, ``parse_dtype``, ``compute_dtype``
- expert routing: ``route_by_expert`` (the router's choices grouped by expert), ``split_experts``,
  ``expert_slices`` (an ``[E, ...]`` tensor per expert)
- attention: ``apply_rope``
- the wrapper modules rules inject, for a plugin that walks an injected model (kt-cpu-amx's fused decode):
  ``KAttention``, ``KExperts``
- autotuning: ``TuneCache`` (the fastest launch configuration per device and problem, kept on disk so the
  next process starts tuned), ``cache_dir`` (ktcore's cache folder)
- weights: ``QuantizedTensor``; the GGUF affine split ``affine_groups``/``AffineGroups`` (blocks whose
  weights are ``scale * code + bias`` per 32, as int8 codes and float32 scale/bias), ``AFFINE_TYPES``,
  ``INT4_TYPES``; the GGML type table ``ggml_type``, ``GGML_TYPES``, ``GGMLType``, ``QK_K``,
  ``DEQUANTIZABLE``; ``lookup_tables`` (the lattice grids and sign table a low-bit type's blocks index,
  as tensors); ``IQ4_NL_VALUES``, ``MXFP4_VALUES`` (the 4-bit value tables of IQ4_NL/IQ4_XS and MXFP4, whose
  e2m1 values are doubled to integers); ``dequantize`` (the torch reference dequantizer)
"""

from ..builtin.attention import KAttentionMLA, KAttentionSDPA, apply_rope
from ..builtin._common import check_shape, module_dtype, parse_dtype
from ..builtin.experts import (
    KExpertsTorch,
    check_expert_weights,
    expert_slices,
    gated_experts_dims,
    route_by_expert,
    split_experts,
)
from ..builtin.experts_gpt_oss import GptOssExpertsOp
from ..builtin.linear import KLinearTorch
from ..builtin.matrix_ops import KExpertsByMatrix, KLinearByMatrix
from ..builtin.rope import KRoPETorch
from ..hookspecs import hookimpl
from ..modules import KAttention, KExperts
from ..ops import ANY_DEVICE, ROLES, Op, stream_capturing
from ..tune_cache import TuneCache, cache_dir
from ..weights.affine import AFFINE_TYPES, INT4_TYPES, AffineGroups, affine_groups, compute_dtype
from ..weights.dequant import IQ4_NL_VALUES, dequantize
from ..weights.dequant_lowbit import MXFP4_VALUES, lookup_tables
from ..weights.quants import DEQUANTIZABLE, GGML_TYPES, QK_K, GGMLType, ggml_type
from ..weights.tensor import QuantizedTensor

__all__ = [
    "AFFINE_TYPES", "ANY_DEVICE", "AffineGroups", "DEQUANTIZABLE", "GGMLType", "GGML_TYPES", "GptOssExpertsOp", "INT4_TYPES",
    "IQ4_NL_VALUES",
    "KAttention", "KAttentionMLA", "KAttentionSDPA", "KExperts", "KExpertsByMatrix", "KExpertsTorch", "KLinearByMatrix", "KLinearTorch",
    "KRoPETorch", "MXFP4_VALUES", "Op", "QK_K", "QuantizedTensor", "ROLES", "TuneCache", "affine_groups", "apply_rope",
    "cache_dir", "check_expert_weights",
    "check_shape", "compute_dtype", "dequantize", "expert_slices", "gated_experts_dims", "ggml_type", "hookimpl",
    "lookup_tables", "module_dtype", "parse_dtype", "route_by_expert", "split_experts", "stream_capturing",
]
