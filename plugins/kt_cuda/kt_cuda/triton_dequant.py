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


# type -> (kernel, blocks per program); block geometry from ktcore's GGML type table
_KERNELS = {
    "Q4_0": (_dq_q4_0, 64),
    "Q4_1": (_dq_q4_1, 64),
    "Q8_0": (_dq_q8_0, 64),
    "Q4_K": (_dq_q4_k, 8),
    "Q5_K": (_dq_q5_k, 8),
    "Q6_K": (_dq_q6_k, 8),
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
        kernel[(triton.cdiv(n_blocks, bb),)](raw.contiguous(), out, n_blocks, BB=bb, num_warps=4, enable_fp_fusion=False)
    return out


def _for(ggml_type: str):
    def fn(raw: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(raw, ggml_type, shape, dtype)

    fn.__name__ = f"dequantize_{ggml_type.lower()}_triton"
    return fn


DEQUANTIZERS = {ggml_type: _for(ggml_type) for ggml_type in _KERNELS}
