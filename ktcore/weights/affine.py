"""GGUF blocks as per-group affine integers: ``w = scale * code + bias`` over groups of 32 weights.

Vendor weight-only-quantized matmuls take integer weights with a scale (and an offset or zero point) per
group of input features. Every GGUF format whose weights are an integer times a per-32 scale plus a per-32
constant converts into that form without requantizing:

| type | code | scale | bias | bits |
|---|---|---|---|---|
| Q4_0 | q - 8 | d | 0 | 4 |
| Q4_1 | q - 8 | d | m + 8 d | 4 |
| Q4_K | q - 8 | d * sc_j | 8 d sc_j - dmin * m_j | 4 |
| Q5_0 | q - 16 | d | 0 | 8 |
| Q5_1 | q - 16 | d | m + 16 d | 8 |
| Q5_K | q - 16 | d * sc_j | 16 d sc_j - dmin * m_j | 8 |
| Q8_0 | q | d | 0 | 8 |

(``d``, ``m``, ``dmin`` are the blocks' halves, ``sc_j``/``m_j`` the 6-bit sub-block scales and mins of
the K-quants.) Codes are centred so that 4-bit codes fit a signed int4 and 5-bit ones a signed int8
with a small bias. Q2_K, Q3_K and Q6_K use groups of 16 and have no such form here: callers dequantize them.

Scale and bias are float32, computed with the same products as ggml's dequantizer, so
``dequantize()`` equals ``gguf.quants.dequantize`` up to the rounding of one float32 addition in bias.
Block layouts are ggml's ``ggml-common.h``; block sizes come from the type table in ``quants``.
``compute_dtype`` parses the activation dtype such vendor matmuls run in (an op option).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .quants import AFFINE_TYPES, INT4_TYPES  # noqa: F401 (re-exported)
from .quants import ggml_type as _type_entry

GROUP = 32

COMPUTE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def compute_dtype(op_name: str, value: str | torch.dtype) -> torch.dtype:
    """The ``compute_dtype`` op option (a name or a torch dtype) -> the activation dtype; errors name the op."""
    if isinstance(value, torch.dtype) and value in COMPUTE_DTYPES.values():
        return value
    if value in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[value]
    raise ValueError(f"{op_name}: compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {value!r}")


@dataclass(frozen=True)
class AffineGroups:
    """``w[..., k] = scale[..., k // 32] * codes[..., k] + bias[..., k // 32]`` (``bias`` None: 0)."""

    codes: torch.Tensor  # int8 [..., K]; in [-8, 7] when bits == 4
    scale: torch.Tensor  # float32 [..., K / 32]
    bias: torch.Tensor | None  # float32 [..., K / 32]
    bits: int
    group_size: int = GROUP

    def dequantize(self) -> torch.Tensor:
        """The float32 weights, as a torch reference for every repacking built on this."""
        *lead, k = self.codes.shape
        groups = self.codes.reshape(*lead, k // self.group_size, self.group_size).float()
        w = groups * self.scale.unsqueeze(-1)
        if self.bias is not None:
            w = w + self.bias.unsqueeze(-1)
        return w.reshape(*lead, k)


class GGMLAffineError(ValueError):
    pass


def _f16(col: torch.Tensor) -> torch.Tensor:
    """Bytes ``[n, 2]`` of little-endian halves -> float32 ``[n, 1]``."""
    return col.contiguous().view(torch.float16).float()


def _low_then_high(qs: torch.Tensor) -> torch.Tensor:
    """``[n, 16]`` bytes of a 32-weight block -> 32 nibbles: weights 0-15 are the low nibbles, 16-31 the high."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _k_subblocks(qs: torch.Tensor) -> torch.Tensor:
    """``[n, 128]`` bytes of a K-quant super-block -> ``[n, 8, 32]`` nibbles: 32-byte chunk c holds
    sub-block 2c in its low nibbles and 2c+1 in its high nibbles."""
    chunks = qs.reshape(-1, 4, 1, 32)
    return torch.cat([chunks & 0x0F, chunks >> 4], dim=2).reshape(-1, 8, 32)


def _k_scale_min(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins, float32 ``[n, 8]`` each (ggml's get_scale_min_k4)."""
    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _bits32(packed: torch.Tensor) -> torch.Tensor:
    """``[n, 4]`` bytes (a little-endian uint32) -> its 32 bits ``[n, 32]``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(packed.shape[0], 32)


def _blocks(raw: torch.Tensor, ggml_type: str, shape: tuple[int, ...], name: str) -> torch.Tensor:
    entry = _type_entry(ggml_type)
    per_block, nbytes = entry.block_size, entry.type_size
    if not shape or shape[-1] % per_block:
        raise GGMLAffineError(f"{name}: last dimension of {tuple(shape)} is not a multiple of the {ggml_type} block size {per_block}")
    expected = math.prod(shape) // per_block * nbytes
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() != expected:
        raise GGMLAffineError(f"{name}: {ggml_type} {tuple(shape)} needs {expected} bytes (1-D uint8), got {raw.numel()} {raw.dtype}")
    return raw.reshape(-1, nbytes)


def affine_groups(raw: torch.Tensor, ggml_type: str, shape: tuple[int, ...], name: str = "tensor") -> AffineGroups:
    """Split raw GGUF blocks of ``ggml_type`` (one of ``AFFINE_TYPES``) holding a ``shape`` tensor."""
    if ggml_type not in AFFINE_TYPES:
        raise GGMLAffineError(
            f"{name}: GGML type {ggml_type} has no per-32 affine integer form; supported: {', '.join(sorted(AFFINE_TYPES))}"
        )
    shape = tuple(int(s) for s in shape)
    b = _blocks(raw, ggml_type, shape, name)
    n = b.shape[0]
    bias = None
    if ggml_type == "Q4_0":
        scale = _f16(b[:, 0:2])
        codes = _low_then_high(b[:, 2:18]).to(torch.int8) - 8
    elif ggml_type == "Q4_1":
        scale, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        codes = _low_then_high(b[:, 4:20]).to(torch.int8) - 8
        bias = m + 8.0 * scale
    elif ggml_type == "Q5_0":
        scale = _f16(b[:, 0:2])
        codes = (_low_then_high(b[:, 6:22]) | (_bits32(b[:, 2:6]) << 4)).to(torch.int8) - 16
    elif ggml_type == "Q5_1":
        scale, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        codes = (_low_then_high(b[:, 8:24]) | (_bits32(b[:, 4:8]) << 4)).to(torch.int8) - 16
        bias = m + 16.0 * scale
    elif ggml_type == "Q8_0":
        scale = _f16(b[:, 0:2])
        codes = b[:, 2:34].contiguous().view(torch.int8)
    else:  # Q4_K, Q5_K: 8 sub-blocks of 32 per super-block
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = _k_scale_min(b[:, 4:16])
        scale = (d * sc).reshape(n * 8, 1)
        low_bits = 4 if ggml_type == "Q4_K" else 5
        centre = 1 << (low_bits - 1)
        if ggml_type == "Q4_K":
            q = _k_subblocks(b[:, 16:144])
        else:  # qh[32]: bit j of byte l is the fifth bit of weight l of sub-block j
            shifts = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 8, 1)
            high = (b[:, 16:48].reshape(n, 1, 32) >> shifts) & 1
            q = _k_subblocks(b[:, 48:176]) | (high << 4)
        codes = q.reshape(n * 8, 32).to(torch.int8) - centre
        bias = float(centre) * scale - (dmin * mn).reshape(n * 8, 1)
    bits = 4 if ggml_type in INT4_TYPES else 8
    lead, k = shape[:-1], shape[-1]
    return AffineGroups(
        codes=codes.reshape(*lead, k),
        scale=scale.reshape(*lead, k // GROUP),
        bias=None if bias is None else bias.reshape(*lead, k // GROUP),
        bits=bits,
    )
