"""GGUF dequantization on the GPU in one Triton kernel per type (one pass: raw bytes in, values out).

ktcore's reference dequantizers (``ktcore.weights.dequant``) are vectorized torch and also run on CUDA,
but make a dozen passes with intermediates; these read each byte once. Each program expands ``BB``
blocks as a ``[BB, block_size]`` tile; element ``e`` of a block computes its own byte address, shift and
scale. Floating-point contraction is off (``enable_fp_fusion=False``) so the float32 results are
bit-exact with ``gguf.quants`` (same operations, same order), then rounded once to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ktcore.sdk import ggml_type as ggml_type_info
from ktcore.sdk import lookup_tables


@triton.jit
def _half(base, off):
    lo = tl.load(base + off).to(tl.uint16)
    hi = tl.load(base + off + 1).to(tl.uint16)
    return ((hi << 8) | lo).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _tile(pid, n_blocks, TYPE_SIZE: tl.constexpr, BB: tl.constexpr, QK: tl.constexpr):
    blk = pid * BB + tl.arange(0, BB)
    mask = (blk < n_blocks)[:, None]
    blk = tl.where(blk < n_blocks, blk, 0).to(tl.int64)
    e = tl.arange(0, QK)[None, :]
    return blk, mask, e


@triton.jit
def _store(out, blk, e, mask, w, QK: tl.constexpr):
    tl.store(out + blk[:, None] * QK + e, w.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _dq_q4_0(raw, out, n_blocks, BB: tl.constexpr):
    blk, mask, e = _tile(tl.program_id(0), n_blocks, 18, BB, 32)
    base = raw + blk[:, None] * 18
    d = _half(base, 0)
    q = (tl.load(base + 2 + e % 16) >> ((e // 16) * 4)) & 0xF
    w = d * (q.to(tl.int32) - 8).to(tl.float32)
    _store(out, blk, e, mask, w, 32)


@triton.jit
def _dq_q4_1(raw, out, n_blocks, BB: tl.constexpr):
    blk, mask, e = _tile(tl.program_id(0), n_blocks, 20, BB, 32)
    base = raw + blk[:, None] * 20
    d = _half(base, 0)
    m = _half(base, 2)
    q = (tl.load(base + 4 + e % 16) >> ((e // 16) * 4)) & 0xF
    w = d * q.to(tl.float32) + m
    _store(out, blk, e, mask, w, 32)


@triton.jit
def _dq_q8_0(raw, out, n_blocks, BB: tl.constexpr):
    blk, mask, e = _tile(tl.program_id(0), n_blocks, 34, BB, 32)
    base = raw + blk[:, None] * 34
    d = _half(base, 0)
    q = tl.load(base + 2 + e).to(tl.int8, bitcast=True).to(tl.float32)
    _store(out, blk, e, mask, q * d, 32)


@triton.jit
def _k_scale_min(base, sb):
    """Q4_K/Q5_K: six-bit scale and min of sub-block ``sb`` (0..7) from the 12 bytes at ``base + 4``."""
    s = base + 4
    low = sb < 4
    a = tl.load(s + tl.where(low, sb, sb + 4))  # s[j] for j < 4, s[j+4] after
    b = tl.load(s + sb + 4)  # s[j+4]
    c = tl.load(s + sb % 4)  # s[j-4] for j >= 4
    dd = tl.load(s + sb)  # s[j]
    sc = tl.where(low, a & 63, (a & 0xF) | ((c >> 6) << 4))
    mn = tl.where(low, b & 63, (b >> 4) | ((dd >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _dq_q4_k(raw, out, n_blocks, BB: tl.constexpr):
    blk, mask, e = _tile(tl.program_id(0), n_blocks, 144, BB, 256)
    base = raw + blk[:, None] * 144
    d = _half(base, 0)
    dmin = _half(base, 2)
    sb = e // 32
    sc, mn = _k_scale_min(base, sb)
    q = (tl.load(base + 16 + (sb // 2) * 32 + e % 32) >> ((sb % 2) * 4)) & 0xF
    w = (d * sc) * q.to(tl.float32) - dmin * mn
    _store(out, blk, e, mask, w, 256)


@triton.jit
def _dq_q5_k(raw, out, n_blocks, BB: tl.constexpr):
    blk, mask, e = _tile(tl.program_id(0), n_blocks, 176, BB, 256)
    base = raw + blk[:, None] * 176
    d = _half(base, 0)
    dmin = _half(base, 2)
    sb = e // 32
    t = e % 32
    sc, mn = _k_scale_min(base, sb)
    ql = (tl.load(base + 48 + (sb // 2) * 32 + t) >> ((sb % 2) * 4)) & 0xF
    qh = (tl.load(base + 16 + t) >> sb) & 1
    q = (ql | (qh << 4)).to(tl.float32)
    w = (d * sc) * q - dmin * mn
    _store(out, blk, e, mask, w, 256)


@triton.jit
def _dq_q6_k(raw, out, n_blocks, BB: tl.constexpr):
    blk, mask, e = _tile(tl.program_id(0), n_blocks, 210, BB, 256)
    base = raw + blk[:, None] * 210
    d = _half(base, 208)
    h = e // 128
    r = e % 128
    ql = (tl.load(base + h * 64 + r % 64) >> ((r // 64) * 4)) & 0xF
    qh = (tl.load(base + 128 + h * 32 + r % 32) >> ((r // 32) * 2)) & 3
    q = ((ql | (qh << 4)).to(tl.int32) - 32).to(tl.float32)
    sc = tl.load(base + 192 + e // 16).to(tl.int8, bitcast=True).to(tl.float32)
    w = (d * sc) * q
    _store(out, blk, e, mask, w, 256)


# -- low-bit types: their lookup tables (lattice grids, sign table; ktcore.sdk.lookup_tables) come in as tensors --


@triton.jit
def _u32(base, off):
    """The little-endian uint32 at byte ``off`` (as int64: Triton's shifts on it stay unsigned)."""
    b0 = tl.load(base + off).to(tl.int64)
    b1 = tl.load(base + off + 1).to(tl.int64)
    b2 = tl.load(base + off + 2).to(tl.int64)
    b3 = tl.load(base + off + 3).to(tl.int64)
    return b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)


@triton.jit
def _sign(ksigns, idx, bit):
    """+1 or -1: bit ``bit`` of ``ksigns[idx]`` (a 7-bit index) clear or set."""
    s = (tl.load(ksigns + idx) >> bit) & 1
    return 1.0 - 2.0 * s.to(tl.float32)


@triton.jit
def _byte_sign(base, off, bit):
    return 1.0 - 2.0 * ((tl.load(base + off) >> bit) & 1).to(tl.float32)


@triton.jit
def _nibble_scale(base, off, e, d):
    """IQ2_XS/IQ2_S: ``d * (0.5 + s) * 0.25`` with ``s`` the 4-bit scale of element ``e``'s 16-value group."""
    sc = (tl.load(base + off + e // 32) >> (((e // 16) % 2) * 4)) & 0xF
    return d * (0.5 + sc.to(tl.float32)) * 0.25


@triton.jit
def _dq_iq2_xxs(raw, out, n_blocks, grid, ksigns, BB: tl.constexpr):
    blk, mask, e = _tile(tl.program_id(0), n_blocks, 66, BB, 256)
    base = raw + blk[:, None] * 66
    d = _half(base, 0)
    ib = e // 32
    l = (e % 32) // 8
    aux = _u32(base, 2 + ib * 8 + 4)
    db = d * (0.5 + (aux >> 28).to(tl.float32)) * 0.25
    idx = tl.load(base + 2 + ib * 8 + l).to(tl.int32)
    g = tl.load(grid + idx * 8 + e % 8)
    w = db * g * _sign(ksigns, (aux >> (7 * l)) & 0x7F, e % 8)
    _store(out, blk, e, mask, w, 256)


@triton.jit
def _dq_iq2_xs(raw, out, n_blocks, grid, ksigns, BB: tl.constexpr):
    blk, mask, e = _tile(tl.program_id(0), n_blocks, 74, BB, 256)
    base = raw + blk[:, None] * 74
    d = _half(base, 0)
    i = e // 8
    q = tl.load(base + 2 + 2 * i).to(tl.int32) | (tl.load(base + 3 + 2 * i).to(tl.int32) << 8)
    db = _nibble_scale(base, 66, e, d)
    g = tl.load(grid + (q & 511) * 8 + e % 8)
    w = db * g * _sign(ksigns, q >> 9, e % 8)
    _store(out, blk, e, mask, w, 256)


@triton.jit
def _dq_iq2_s(raw, out, n_blocks, grid, BB: tl.constexpr):
    blk, mask, e = _tile(tl.program_id(0), n_blocks, 82, BB, 256)
    base = raw + blk[:, None] * 82
    d = _half(base, 0)
    i = e // 8
    db = _nibble_scale(base, 74, e, d)
    qh = (tl.load(base + 66 + i // 4) >> ((i % 4) * 2)) & 3
    idx = tl.load(base + 2 + i).to(tl.int32) | (qh.to(tl.int32) << 8)
    g = tl.load(grid + idx * 8 + e % 8)
    w = db * g * _byte_sign(base, 34 + i, e % 8)
    _store(out, blk, e, mask, w, 256)


@triton.jit
def _dq_iq3_xxs(raw, out, n_blocks, grid, ksigns, BB: tl.constexpr):
    blk, mask, e = _tile(tl.program_id(0), n_blocks, 98, BB, 256)
    base = raw + blk[:, None] * 98
    d = _half(base, 0)
    ib = e // 32
    aux = _u32(base, 66 + 4 * ib)
    db = d * (0.5 + (aux >> 28).to(tl.float32)) * 0.5
    idx = tl.load(base + 2 + e // 4).to(tl.int32)
    g = tl.load(grid + idx * 4 + e % 4)
    w = db * g * _sign(ksigns, (aux >> (7 * ((e % 32) // 8))) & 0x7F, e % 8)
    _store(out, blk, e, mask, w, 256)


@triton.jit
def _dq_iq3_s(raw, out, n_blocks, grid, BB: tl.constexpr):
    blk, mask, e = _tile(tl.program_id(0), n_blocks, 110, BB, 256)
    base = raw + blk[:, None] * 110
    d = _half(base, 0)
    ib = e // 32
    sc = (tl.load(base + 106 + ib // 2) >> ((ib % 2) * 4)) & 0xF
    db = d * (1 + 2 * sc.to(tl.int32)).to(tl.float32)
    gi = e // 4
    qh = (tl.load(base + 66 + gi // 8) >> (gi % 8)) & 1
    idx = tl.load(base + 2 + gi).to(tl.int32) | (qh.to(tl.int32) << 8)
    g = tl.load(grid + idx * 4 + e % 4)
    w = db * g * _byte_sign(base, 74 + e // 8, e % 8)
    _store(out, blk, e, mask, w, 256)


@triton.jit
def _dq_iq1_s(raw, out, n_blocks, grid, BB: tl.constexpr):
    blk, mask, e = _tile(tl.program_id(0), n_blocks, 50, BB, 256)
    base = raw + blk[:, None] * 50
    d = _half(base, 0)
    k = e // 32
    qh = tl.load(base + 34 + 2 * k).to(tl.int32) | (tl.load(base + 35 + 2 * k).to(tl.int32) << 8)
    dl = d * (2 * ((qh >> 12) & 7) + 1).to(tl.float32)
    delta = tl.where((qh & 0x8000) == 0, 0.125, -0.125)
    gi = e // 8
    idx = tl.load(base + 2 + gi).to(tl.int32) | (((qh >> (3 * (gi % 4))) & 7) << 8)
    g = tl.load(grid + idx * 8 + e % 8)
    _store(out, blk, e, mask, dl * (g + delta), 256)


@triton.jit
def _dq_iq1_m(raw, out, n_blocks, grid, BB: tl.constexpr):
    blk, mask, e = _tile(tl.program_id(0), n_blocks, 56, BB, 256)
    base = raw + blk[:, None] * 56
    # the block's f16 scale: the top nibbles of the four uint16 scale words (bytes 49, 51, 53, 55)
    hb = (tl.load(base + 49 + 0 * e) >> 4).to(tl.uint16)
    hb = hb | ((tl.load(base + 51 + 0 * e) >> 4).to(tl.uint16) << 4)
    hb = hb | ((tl.load(base + 53 + 0 * e) >> 4).to(tl.uint16) << 8)
    hb = hb | ((tl.load(base + 55 + 0 * e) >> 4).to(tl.uint16) << 12)
    d = hb.to(tl.float16, bitcast=True).to(tl.float32)
    t = e // 16
    word = tl.load(base + 48 + 2 * (t // 4)).to(tl.int32) | (tl.load(base + 49 + 2 * (t // 4)).to(tl.int32) << 8)
    dl = d * (2 * ((word >> (3 * (t % 4))) & 7) + 1).to(tl.float32)
    gi = e // 8
    qh = (tl.load(base + 32 + gi // 2) >> ((gi % 2) * 4)) & 0xF
    idx = tl.load(base + gi).to(tl.int32) | ((qh & 7).to(tl.int32) << 8)
    delta = tl.where((qh & 8) == 0, 0.125, -0.125)
    g = tl.load(grid + idx * 8 + e % 8)
    _store(out, blk, e, mask, dl * (g + delta), 256)


@triton.jit
def _dq_tq1_0(raw, out, n_blocks, BB: tl.constexpr):
    blk, mask, e = _tile(tl.program_id(0), n_blocks, 54, BB, 256)
    base = raw + blk[:, None] * 54
    d = _half(base, 52)
    # values 0-159: bytes 0-31 times 3^(e // 32); 160-239: bytes 32-47 times 3^((e-160) // 16); 240-255: qh
    off = tl.where(e < 160, e % 32, tl.where(e < 240, 32 + (e - 160) % 16, 48 + (e - 240) % 4))
    k = tl.where(e < 160, e // 32, tl.where(e < 240, (e - 160) // 16, (e - 240) // 4))
    pow3 = tl.where(k == 0, 1, tl.where(k == 1, 3, tl.where(k == 2, 9, tl.where(k == 3, 27, 81))))
    q = (tl.load(base + off).to(tl.int32) * pow3) & 0xFF
    w = d * (((q * 3) >> 8) - 1).to(tl.float32)
    _store(out, blk, e, mask, w, 256)


@triton.jit
def _dq_tq2_0(raw, out, n_blocks, BB: tl.constexpr):
    blk, mask, e = _tile(tl.program_id(0), n_blocks, 66, BB, 256)
    base = raw + blk[:, None] * 66
    d = _half(base, 64)
    r = e % 128
    q = (tl.load(base + (e // 128) * 32 + r % 32) >> ((r // 32) * 2)) & 3
    w = d * (q.to(tl.int32) - 1).to(tl.float32)
    _store(out, blk, e, mask, w, 256)


@triton.jit
def _dq_mxfp4(raw, out, n_blocks, BB: tl.constexpr):
    blk, mask, e = _tile(tl.program_id(0), n_blocks, 17, BB, 32)
    base = raw + blk[:, None] * 17
    x = tl.load(base + 0 * e).to(tl.int32)
    bits = tl.where(x < 2, (x * 0 + 0x00200000) << x, (x - 1) << 23)  # ggml_e8m0_to_fp32_half
    d = bits.to(tl.float32, bitcast=True)
    c = ((tl.load(base + 1 + e % 16) >> ((e // 16) * 4)) & 0xF).to(tl.int32)
    m = c & 7  # e2m1 doubled: 0, 1, 2, 3, 4, 6, 8, 12
    mag = tl.where(m < 4, m, (2 + (m & 1)) << ((m >> 1) - 1))
    v = tl.where(c >= 8, -mag, mag).to(tl.float32)
    _store(out, blk, e, mask, d * v, 32)


# type -> (kernel, blocks per program); block geometry from ktcore's GGML type table
_KERNELS = {
    "Q4_0": (_dq_q4_0, 64),
    "Q4_1": (_dq_q4_1, 64),
    "Q8_0": (_dq_q8_0, 64),
    "Q4_K": (_dq_q4_k, 8),
    "Q5_K": (_dq_q5_k, 8),
    "Q6_K": (_dq_q6_k, 8),
    "IQ1_S": (_dq_iq1_s, 8),
    "IQ1_M": (_dq_iq1_m, 8),
    "IQ2_XXS": (_dq_iq2_xxs, 8),
    "IQ2_XS": (_dq_iq2_xs, 8),
    "IQ2_S": (_dq_iq2_s, 8),
    "IQ3_XXS": (_dq_iq3_xxs, 8),
    "IQ3_S": (_dq_iq3_s, 8),
    "TQ1_0": (_dq_tq1_0, 8),
    "TQ2_0": (_dq_tq2_0, 8),
    "MXFP4": (_dq_mxfp4, 64),
}


def dequantize(raw: torch.Tensor, ggml_type: str, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw GGML blocks (1-D uint8 on a CUDA device) -> ``dtype`` tensor of ``shape`` on that device."""
    kernel, bb = _KERNELS[ggml_type]
    per_block, type_size = ggml_type_info(ggml_type).block_size, ggml_type_info(ggml_type).type_size
    count = 1
    for s in shape:
        count *= int(s)
    n_blocks = count // per_block
    if count % per_block or raw.numel() != n_blocks * type_size:
        raise ValueError(f"{ggml_type} {tuple(shape)}: needs {n_blocks * type_size} bytes in whole blocks, got {raw.numel()}")
    out = torch.empty(tuple(int(s) for s in shape), dtype=dtype, device=raw.device)
    if n_blocks:
        tables = lookup_tables(ggml_type, raw.device)
        kernel[(triton.cdiv(n_blocks, bb),)](raw.contiguous(), out, n_blocks, *tables, BB=bb, num_warps=4,
                                             enable_fp_fusion=False)
    return out


def _for(ggml_type: str):
    def fn(raw: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(raw, ggml_type, shape, dtype)

    fn.__name__ = f"dequantize_{ggml_type.lower()}_triton"
    return fn


DEQUANTIZERS = {ggml_type: _for(ggml_type) for ggml_type in _KERNELS}
