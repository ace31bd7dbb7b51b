"""The one table of GGML tensor types: every per-type fact loaders, dequantizers and kernels use.

Block geometry comes from gguf-py (``gguf.constants.GGML_QUANT_SIZES``, ``QK_K``: the format's reference);
the rest is ktcore's: the torch dequantizer, where a block's float16 scales sit, whether (with how many
bits) its weights are ``scale * code + bias`` per 32 (``affine_bits``: what weight-only-quantized GEMMs take
as they are), which lookup tables a low-bit type's blocks index (``lookup_tables``: gguf-py's lattice grids
and ggml's sign table, read by ``dequant_lowbit.lookup_tables``), and for a type ktcore cannot read, the
nearest one it can. Every other module, and every plugin (through ``ktcore.sdk``), reads these facts from here.
The numeric ids are GGML's; the names are the keys used in ``QuantizedTensor.ggml_type``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from gguf.constants import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

from . import dequant as _dq
from .dequant_lowbit import LOWBIT_DEQUANTIZERS


@dataclass(frozen=True)
class GGMLType:
    name: str
    type_id: int
    block_size: int  # elements per block
    type_size: int  # bytes per block
    # blocks[n_blocks, type_size] (uint8) -> float32 [n_blocks, block_size]; None: no dequantizer
    dequantize_blocks: Callable[[torch.Tensor], torch.Tensor] | None
    scale_fields: tuple[int, ...] = ()  # byte offsets of the float16 scales (d, dmin) inside one block
    affine_bits: int | None = None  # weights are scale * code + bias per 32, codes of this many bits
    lookup_tables: tuple[str, ...] = ()  # gguf-py lattice grids ("IQ2_XS") and/or "ksigns" its blocks index
    nearest_supported: str | None = None  # for a type without dequantizer: the closest one to re-quantize to
    gguf: bool = True  # False: a type of native checkpoints GGUF has not (its type_id is -1, outside GGML's)

    def nbytes(self, n_elements: int) -> int:
        return n_elements // self.block_size * self.type_size


# ggml's block_* structs (ggml-common.h): where the float16 scales sit. IQ1_M has none (its float16 scale
# is spread over the top nibbles of bytes 48-55), MXFP4's scale is one e8m0 byte at 0.
_SCALE_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "IQ4_NL": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_XS": (0,),
    "IQ1_S": (0,), "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,),
    "TQ1_0": (52,), "TQ2_0": (64,),
}
_AFFINE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q8_0": 8}
# the i-quants' lookups (ggml's dequantize_row_iq*): IQ1_M indexes IQ1_S's lattice
_LOOKUP_TABLES = {
    "IQ1_S": ("IQ1_S",), "IQ1_M": ("IQ1_S",), "IQ2_XXS": ("IQ2_XXS", "ksigns"), "IQ2_XS": ("IQ2_XS", "ksigns"),
    "IQ2_S": ("IQ2_S",), "IQ3_XXS": ("IQ3_XXS", "ksigns"), "IQ3_S": ("IQ3_S",),
}
# The supported type closest to each one ktcore cannot read (named in the error, so the user knows what to
# re-quantize the tensor to: ``llama-quantize --tensor-type NAME=TYPE``).
_NEAREST_SUPPORTED = {
    "Q8_1": "Q8_0", "Q8_K": "Q8_0", "NVFP4": "MXFP4", "Q1_0": "IQ1_S",
    "F64": "F32", "I8": "F16", "I16": "F32", "I32": "F32", "I64": "F32",
}

# Block geometry comes from gguf-py (the format's reference); the dequantizers are ours.
_DEQUANTIZERS = {
    "F32": _dq.f32_blocks,
    "F16": _dq.f16_blocks,
    "BF16": _dq.bf16_blocks,
    "Q4_0": _dq.q4_0_blocks,
    "Q4_1": _dq.q4_1_blocks,
    "Q5_0": _dq.q5_0_blocks,
    "Q5_1": _dq.q5_1_blocks,
    "Q8_0": _dq.q8_0_blocks,
    "Q2_K": _dq.q2_k_blocks,
    "Q3_K": _dq.q3_k_blocks,
    "Q4_K": _dq.q4_k_blocks,
    "Q5_K": _dq.q5_k_blocks,
    "Q6_K": _dq.q6_k_blocks,
    "IQ4_NL": _dq.iq4_nl_blocks,
    "IQ4_XS": _dq.iq4_xs_blocks,
    **LOWBIT_DEQUANTIZERS,
}

GGML_TYPES: dict[str, GGMLType] = {
    t.name: GGMLType(t.name, int(t.value), *GGML_QUANT_SIZES[t], _DEQUANTIZERS.get(t.name),
                     _SCALE_FIELDS.get(t.name, ()), _AFFINE_BITS.get(t.name), _LOOKUP_TABLES.get(t.name, ()),
                     _NEAREST_SUPPORTED.get(t.name))
    for t in GGMLQuantizationType
    if t in GGML_QUANT_SIZES
}

# Not a GGML type: the e4m3 bytes of native FP8 checkpoints (ktcore/weights/fp8.py). Their 128x128 block
# scales travel beside the bytes (QuantizedTensor.scale), so the block dequantizer gives the unscaled values
# and ``dequantize`` applies the scales.
GGML_TYPES["F8_E4M3"] = GGMLType("F8_E4M3", -1, 1, 1, _dq.f8_e4m3_blocks, gguf=False)

GGML_TYPES_BY_ID: dict[int, GGMLType] = {t.type_id: t for t in GGML_TYPES.values() if t.gguf}

DEQUANTIZABLE: frozenset[str] = frozenset(n for n, t in GGML_TYPES.items() if t.dequantize_blocks is not None)
AFFINE_TYPES: frozenset[str] = frozenset(n for n, t in GGML_TYPES.items() if t.affine_bits is not None)
INT4_TYPES: frozenset[str] = frozenset(n for n, t in GGML_TYPES.items() if t.affine_bits == 4)


def ggml_type(name_or_id: str | int) -> GGMLType:
    """The table entry for a GGML type name (``"Q4_K"``) or numeric id; ``KeyError`` names the known ones."""
    table = GGML_TYPES_BY_ID if isinstance(name_or_id, int) else GGML_TYPES
    try:
        return table[name_or_id]
    except KeyError:
        raise KeyError(f"unknown GGML type {name_or_id!r}; known: {', '.join(GGML_TYPES)}") from None
