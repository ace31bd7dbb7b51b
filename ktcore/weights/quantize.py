"""Quantizing float tensors to GGML blocks, for the writer and tests.

``gguf.quants.quantize`` (llama.cpp's reference rounding) does F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, the ternary TQ1_0/TQ2_0 and MXFP4. It cannot produce K-quants, so Q4_K and Q6_K are done here with a
plain min/max scale search (valid blocks that dequantize to a close approximation, not llama.cpp's
error-minimizing search).
"""

from __future__ import annotations

import numpy as np
from gguf.constants import QK_K

GGUF_QUANTIZABLE = frozenset({"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "MXFP4"})
OWN_QUANTIZABLE = frozenset({"Q4_K", "Q6_K"})
QUANTIZABLE = GGUF_QUANTIZABLE | OWN_QUANTIZABLE


def quantize(values: np.ndarray, type_name: str) -> np.ndarray:
    """``values[..., n]`` (float32) as GGML ``type_name`` bytes ``[..., n / block_size * type_size]``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    values = np.ascontiguousarray(values, dtype=np.float32)
    if type_name in GGUF_QUANTIZABLE:
        out = gguf_quantize(values, GGMLQuantizationType[type_name])
        return out.view(np.uint8).reshape(*values.shape[:-1], -1)
    if type_name == "Q4_K":
        return _rows(values, _q4_k_blocks, 144)
    if type_name == "Q6_K":
        return _rows(values, _q6_k_blocks, 210)
    raise NotImplementedError(f"quantizing to {type_name} is not supported; supported: {', '.join(sorted(QUANTIZABLE))}")


def _rows(values: np.ndarray, fn, type_size: int) -> np.ndarray:
    if values.shape[-1] % QK_K:
        raise ValueError(f"row length {values.shape[-1]} is not a multiple of {QK_K}")
    blocks = fn(values.reshape(-1, QK_K))
    assert blocks.shape[-1] == type_size
    return blocks.reshape(*values.shape[:-1], values.shape[-1] // QK_K * type_size)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0.0)  # each sub-block: value = scale * q - min, q in 0..15
    hi = sub.max(axis=-1)
    scale = (hi - lo) / 15.0
    mins = -lo
    d = (scale.max(axis=-1) / 63.0).astype(np.float16)
    dmin = (mins.max(axis=-1) / 63.0).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.rint(scale / d32), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dmin32 > 0, np.rint(mins / dmin32), 0).clip(0, 63).astype(np.uint8)
        eff_scale = (d32 * sc)[..., None]
        eff_min = (dmin32 * mn)[..., None]
        q = np.where(eff_scale > 0, np.rint((sub + eff_min) / eff_scale), 0).clip(0, 15).astype(np.uint8)
    # 12 scale bytes: see dequant._k_scale_min for the layout
    packed = np.zeros((n, 12), dtype=np.uint8)
    packed[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    # qs: four 32-byte groups, each holding sub-block 2g in low nibbles and 2g+1 in high nibbles
    q = q.reshape(n, 4, 2, 32)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(n, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed, qs], axis=1)


def _q6_k_blocks(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    amax = np.abs(sub).max(axis=-1)
    scale = amax / 31.0  # value = d * sc * (q - 32), q in 0..63
    d = (np.abs(scale).max(axis=-1) / 127.0).astype(np.float16)
    d32 = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.rint(scale / d32), 0).clip(-128, 127).astype(np.int8)
        eff = (d32 * sc)[..., None]
        q = (np.where(eff != 0, np.rint(sub / eff), 0) + 32).clip(0, 63).astype(np.uint8)
    q = q.reshape(n, 2, 4, 32)  # two halves of 128; each: four 32-value rows
    low = q & 0x0F
    high = q >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=-1)
    ql = ql.reshape(n, 128)  # per half: bytes 0..31 hold rows 0|2, bytes 32..63 rows 1|3
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)
