"""The GGML 4-bit formats split into ``(q, scale, min)``, one scale and min per 32 weights, with torch
tensor ops that run wherever the raw bytes are (CUDA here). This is what ``KLinearMarlin`` and
``KExpertsGPU`` repack. Layouts follow ggml's ``ggml-common.h`` (also readable in ``gguf/quants.py``);
``scale * q - min`` in float32 is bit-exact with ``gguf.quants.dequantize``. Other types are expanded by
ktcore's own dequantizers (``ktcore.weights.dequant``), which run on any device.
"""

from __future__ import annotations

import math

import torch

from ktcore.sdk import INT4_TYPES, QK_K, ggml_type

# ggml type name -> (weights per block, bytes per block) of the 4-bit types whose weights are exactly
# ``scale * q - min`` with q in 0..15 over groups of 32 (ktcore's GGML type table)
BLOCK_LAYOUT: dict[str, tuple[int, int]] = {t: (ggml_type(t).block_size, ggml_type(t).type_size) for t in INT4_TYPES}


class GGMLFormatError(ValueError):
    pass


def _blocks(raw: torch.Tensor, ggml_type: str, shape: tuple[int, ...], name: str = "") -> torch.Tensor:
    if ggml_type not in BLOCK_LAYOUT:
        raise GGMLFormatError(f"{name or 'tensor'}: GGML type {ggml_type} is not supported here; known: {sorted(BLOCK_LAYOUT)}")
    per_block, nbytes = BLOCK_LAYOUT[ggml_type]
    count = math.prod(shape)
    if shape and shape[-1] % per_block:
        raise GGMLFormatError(f"{name or 'tensor'}: last dimension {shape[-1]} is not a multiple of the {ggml_type} block size {per_block}")
    expected = count // per_block * nbytes
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() != expected:
        raise GGMLFormatError(
            f"{name or 'tensor'}: expected {expected} raw bytes (uint8, 1-D) for {ggml_type} {tuple(shape)}, "
            f"got {raw.numel()} {raw.dtype} of {raw.dim()} dims"
        )
    return raw.view(-1, nbytes)


def _f16(col: torch.Tensor) -> torch.Tensor:
    """Bytes ``[n, 2]`` holding little-endian halves -> float32 ``[n, 1]``."""
    return col.contiguous().view(torch.float16).float()


def _nibbles_half_split(qs: torch.Tensor) -> torch.Tensor:
    """Bytes ``[n, b]`` -> ``[n, 2b]``: low nibbles first, then high nibbles (ggml's 32-weight blocks)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (uint8 ``[n, 8]`` each)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def split_int4(raw: torch.Tensor, ggml_type: str, shape: tuple[int, ...], name: str = ""):
    """``(q uint8 [..., K], scale f32 [..., K/32], min f32 [..., K/32])`` with ``w = scale*q - min``.

    Exact: ``scale`` and ``min`` are float32 products of the stored halves and 6-bit integers.
    """
    if ggml_type not in INT4_TYPES:
        raise GGMLFormatError(f"{name or 'tensor'}: {ggml_type} is not a 4-bit format; 4-bit: {sorted(INT4_TYPES)}")
    b = _blocks(raw, ggml_type, shape, name)
    n = b.shape[0]
    if ggml_type == "Q4_0":
        d = _f16(b[:, 0:2])
        q = _nibbles_half_split(b[:, 2:18])
        scale, mn = d, d * 8.0
    elif ggml_type == "Q4_1":
        d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        q = _nibbles_half_split(b[:, 4:20])
        scale, mn = d, -m
    else:  # Q4_K: 8 sub-blocks of 32; chunk c of 32 bytes holds sub-block 2c (low) and 2c+1 (high)
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, m = k_scale_min(b[:, 4:16])
        qs = b[:, 16:144].reshape(n, 4, 32)
        q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(n, QK_K)
        scale, mn = d * sc.float(), dmin * m.float()
    lead = tuple(shape[:-1])
    k = shape[-1]
    return q.reshape(*lead, k), scale.reshape(*lead, k // 32), mn.reshape(*lead, k // 32)
