"""Int4 weights x int8 activations on CUDA cores with ``dp4a`` (the ``a8gemv`` kernel of ``Int4Config``).

The word GEMV of ``triton_int4`` turns every nibble into a float and spends about three instructions per
weight; on an H200 it is bound by instruction issue (Nsight Compute: SM throughput ~70% at ~2 TB/s, see
notes/). Here the activations are quantized first to int8 in blocks of 32 (scale ``amax/127``, like
llama.cpp's q8_1), so a weight word (8 nibbles) meets its activations in two ``dp4a``: the low nibbles
``w & 0x0F0F0F0F`` hold weights ``8j, 8j+2, 8j+4, 8j+6`` and the high ones weights ``8j+1, ..., 8j+7``, so
the activations are packed in that order (``xlo`` / ``xhi`` words). Per weight group::

    y += scale * sum_blocks(dx_block * int_dot_block) - min * sum(x_hat)

The result is the exact product of the int4 weight with the int8-rounded activations ``x_hat = dx * xq``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .int4 import Int4Weight
from .triton_int4 import _split_tiles, _store_rows

ACT_BLOCK = 32  # activations per int8 scale


@triton.jit
def _dp4a(a, b, c, EMULATE: tl.constexpr):
    """``c + sum_i a.u8[i] * b.s8[i]`` over the 4 bytes of int32 ``a`` (unsigned) and ``b`` (signed)."""
    if EMULATE:  # Triton's interpreter runs no PTX
        out = c
        for i in tl.static_range(4):
            out += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
        return out
    else:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _dp4a_groups(w, xl, xh, dx, xs, s, mn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP: tl.constexpr, EMULATE: tl.constexpr):
    """Per-group sums ``[BLOCK_M, BLOCK_N, BLOCK_K/GROUP]`` of one K tile, ``scale * sum_blocks(dx * int_dot)
    - min * sum(x_hat)``: weight words ``w [BLOCK_N, BLOCK_K/8]`` against int8 activations in dp4a order
    ``xl`` / ``xh [BLOCK_M, BLOCK_K/8]`` (two dp4a per word), block scales ``dx`` and sums ``xs [BLOCK_M,
    BLOCK_K/32]``, group scales ``s`` and mins ``mn [BLOCK_N, BLOCK_K/GROUP]``."""
    NW: tl.constexpr = BLOCK_K // 8  # words per tile
    NB: tl.constexpr = BLOCK_K // 32  # activation blocks per tile
    NG: tl.constexpr = BLOCK_K // GROUP  # weight groups per tile
    BPG: tl.constexpr = GROUP // 32  # activation blocks per weight group
    lo = (w & 0x0F0F0F0F)[None, :, :]
    hi = ((w >> 4) & 0x0F0F0F0F)[None, :, :]
    zero = tl.zeros([BLOCK_M, BLOCK_N, NW], dtype=tl.int32)
    dot = _dp4a(hi + zero, xh[:, None, :] + zero, _dp4a(lo + zero, xl[:, None, :] + zero, zero, EMULATE), EMULATE)
    blk = tl.sum(tl.reshape(dot, [BLOCK_M, BLOCK_N, NB, 4]), axis=3).to(tl.float32) * dx[:, None, :]
    grp = tl.sum(tl.reshape(blk, [BLOCK_M, BLOCK_N, NG, BPG]), axis=3)
    xg = tl.sum(tl.reshape(xs, [BLOCK_M, NG, BPG]), axis=2)
    return s[None, :, :] * grp - mn[None, :, :] * xg[:, None, :]


@triton.jit
def _round_blocks(x, BLOCK_M: tl.constexpr, NB: tl.constexpr, NW: tl.constexpr):
    """``x [BLOCK_M, 32*NB]`` (float32) -> int8 values in dp4a words (``lo``: even positions of each 8, ``hi``:
    odd; ``[BLOCK_M, NW]``), block scales ``dx`` (``amax/127``) and ``dx * sum(xq)`` ``[BLOCK_M, NB]``. The one
    rounding of both int8-activation kernels (``_quant_act_kernel`` for ``a8gemv``, ``a8one`` per tile)."""
    xb = tl.reshape(x, [BLOCK_M, NB, 32])
    amax = tl.max(tl.abs(xb), axis=2)
    d = amax / 127.0
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    v = xb * inv[:, :, None]
    # round half away from zero: the sum rounds as floor(v + 0.5) / ceil(v - 0.5) do, the conversion truncates
    q = (v + tl.where(v >= 0, 0.5, -0.5)).to(tl.int32)
    xs = d * tl.sum(q, axis=2).to(tl.float32)
    q4 = tl.reshape(q, [BLOCK_M, NW, 4, 2])  # position k = 8*word + 2*byte + half
    shift = (8 * tl.arange(0, 4))[None, None, :, None]
    packed = tl.sum((q4 & 0xFF) << shift, axis=2)  # disjoint bit fields
    lo, hi = tl.split(packed)
    return lo, hi, d, xs


@triton.jit
def _quant_act_kernel(x_ptr, lo_ptr, hi_ptr, d_ptr, s_ptr, K, stride_xm,
                      BLOCK_B: tl.constexpr):
    """Row ``program_id(1)``, blocks of 32 from ``program_id(0) * BLOCK_B``: int8 values packed four to a word
    in dp4a order, the block scale and the block sum of the rounded values (``_round_blocks``)."""
    row = tl.program_id(1).to(tl.int64)
    b0 = tl.program_id(0) * BLOCK_B
    offs = b0 * 32 + tl.arange(0, BLOCK_B * 32)[None, :]
    x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
    lo, hi, d, xs = _round_blocks(x, 1, BLOCK_B, BLOCK_B * 4)
    words = b0 * 4 + tl.arange(0, BLOCK_B * 4)[None, :]
    tl.store(lo_ptr + row * (K // 8) + words, lo, mask=words < K // 8)
    tl.store(hi_ptr + row * (K // 8) + words, hi, mask=words < K // 8)
    blk = b0 + tl.arange(0, BLOCK_B)[None, :]
    tl.store(d_ptr + row * (K // 32) + blk, d, mask=blk < K // 32)
    tl.store(s_ptr + row * (K // 32) + blk, xs, mask=blk < K // 32)


@triton.jit
def _load_words(q_rows, tile, t_end, offs_w, n_mask, NW: tl.constexpr, K):
    """Weight words ``[BLOCK_N, NW]`` of K tile ``tile`` (nothing past ``t_end``)."""
    w_mask = tile * NW + offs_w < tl.minimum(K // 8, t_end * NW)  # one vector compare (see _gemv_store)
    return tl.load(q_rows + (tile * NW + offs_w)[None, :], mask=n_mask[:, None] & w_mask[None, :], other=0,
                   eviction_policy="evict_first")


@triton.jit
def _w4a8_gemv_kernel(
    lo_ptr, hi_ptr, d_ptr, xs_ptr, qw_ptr, s_ptr, m_ptr, b_ptr, y_ptr,
    M, N, K, stride_qn, stride_sn, stride_ym,
    ZP: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    PREFETCH: tl.constexpr, EMULATE: tl.constexpr,
):
    """``BLOCK_M`` activation rows x ``BLOCK_N`` outputs per program; weight words ``[BLOCK_N, BLOCK_K/8]``
    (16-byte loads along K) are split into low/high nibbles once and shared by the rows. ``PREFETCH``: the
    next tile's words are requested before this tile is computed (two tiles in flight per program)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    NW: tl.constexpr = BLOCK_K // 8  # words per tile
    NB: tl.constexpr = BLOCK_K // 32  # activation blocks per tile
    NG: tl.constexpr = BLOCK_K // GROUP  # weight groups per tile
    n_tiles = tl.cdiv(K, BLOCK_K)
    t_begin, t_end = _split_tiles(n_tiles, pid_k, SPLIT_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, NW)
    offs_b = tl.arange(0, NB)
    offs_g = tl.arange(0, NG)
    q_rows = qw_ptr + offs_n.to(tl.int64)[:, None] * stride_qn
    s_rows = offs_n.to(tl.int64)[:, None] * stride_sn
    x_words = offs_m.to(tl.int64)[:, None] * (K // 8)
    x_blocks = offs_m.to(tl.int64)[:, None] * (K // 32)
    acc = tl.zeros([BLOCK_M, BLOCK_N, NG], dtype=tl.float32)
    w = _load_words(q_rows, t_begin, t_end, offs_w, n_mask, NW, K)
    for tile in range(t_begin, t_end):
        if PREFETCH:
            w_next = _load_words(q_rows, tile + 1, t_end, offs_w, n_mask, NW, K)
        w0 = tile * NW
        xm = m_mask[:, None] & (w0 + offs_w < K // 8)[None, :]
        xl = tl.load(lo_ptr + x_words + (w0 + offs_w)[None, :], mask=xm, other=0)
        xh = tl.load(hi_ptr + x_words + (w0 + offs_w)[None, :], mask=xm, other=0)
        b0 = tile * NB
        bm = m_mask[:, None] & (b0 + offs_b < K // 32)[None, :]
        dx = tl.load(d_ptr + x_blocks + (b0 + offs_b)[None, :], mask=bm, other=0.0)
        xs = tl.load(xs_ptr + x_blocks + (b0 + offs_b)[None, :], mask=bm, other=0.0)
        g0 = tile * NG
        gm = n_mask[:, None] & (g0 + offs_g < K // GROUP)[None, :]
        s = tl.load(s_ptr + s_rows + (g0 + offs_g)[None, :], mask=gm, other=0.0).to(tl.float32)
        if HAS_MIN:
            mn = tl.load(m_ptr + s_rows + (g0 + offs_g)[None, :], mask=gm, other=0.0).to(tl.float32)
        else:
            mn = s * ZP
        acc += _dp4a_groups(w, xl, xh, dx, xs, s, mn, BLOCK_M, BLOCK_N, BLOCK_K, GROUP, EMULATE)
        if PREFETCH:
            w = w_next
        else:
            w = _load_words(q_rows, tile + 1, t_end, offs_w, n_mask, NW, K)
    _store_rows(y_ptr, stride_ym, offs_m, m_mask, offs_n, n_mask, tl.sum(acc, axis=2), b_ptr, pid_k, HAS_BIAS, SPLIT_K)


def _emulate() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def quantize_activations(x: torch.Tensor):
    """``x [M, K]`` (K a multiple of 32) -> ``(lo, hi, dx, xsum)``: int8 values in dp4a word order, int32
    ``[M, K/8]`` each, and per block of 32 the scale and ``dx * sum(xq)``, float32 ``[M, K/32]``."""
    M, K = x.shape
    if K % ACT_BLOCK:
        raise ValueError(f"int8 activations come in blocks of {ACT_BLOCK}; got {K} features")
    lo = torch.empty((M, K // 8), device=x.device, dtype=torch.int32)
    hi = torch.empty_like(lo)
    dx = torch.empty((M, K // 32), device=x.device, dtype=torch.float32)
    xs = torch.empty_like(dx)
    block_b = 16
    _quant_act_kernel[(triton.cdiv(K // 32, block_b), M)](x, lo, hi, dx, xs, K, x.stride(0), BLOCK_B=block_b,
                                                          num_warps=4)
    return lo, hi, dx, xs


def dequantize_activations(dx: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The rounded activations ``dx * xq`` as float32 ``[M, K]`` (reference for tests)."""
    M = lo.shape[0]
    b = torch.stack([lo, hi], dim=-1)  # [M, K/8, 2]: word, half
    q = torch.stack([((b << (24 - 8 * i)) >> 24) for i in range(4)], dim=-2)  # [M, K/8, byte, half]
    return q.reshape(M, -1).float() * dx.repeat_interleave(ACT_BLOCK, dim=1)


def w4a8_matmul(x: torch.Tensor, w: Int4Weight, bias, cfg) -> torch.Tensor:
    """``x @ w.T (+ bias)`` with ``x`` rounded to int8 blocks first; ``cfg``: an ``Int4Config`` of kernel
    ``a8gemv`` (``block_m`` rows, ``block_n`` x ``block_k`` tiles)."""
    N, K = w.shape
    M = x.shape[0]
    if w.qweight.stride(-1) != 1:
        raise ValueError("int4 kernel 'a8gemv' reads int32 words along K: it needs N-major packed bytes")
    if cfg.block_k % w.group_size or cfg.block_k % ACT_BLOCK:
        raise ValueError(f"block_k {cfg.block_k} must be a multiple of the group size {w.group_size} and of 32")
    lo, hi, dx, xs = quantize_activations(x)
    split = cfg.split_k
    y = (torch.zeros if split > 1 else torch.empty)((M, N), device=x.device,
                                                    dtype=torch.float32 if split > 1 else x.dtype)
    qw = w.qweight.view(torch.int32)
    mins = w.mins if w.mins is not None else w.scales
    b = bias if bias is not None else w.scales
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m), split)
    _w4a8_gemv_kernel[grid](lo, hi, dx, xs, qw, w.scales, mins, b, y, M, N, K, qw.stride(0), w.scales.stride(0),
                            y.stride(0), ZP=w.zero_point, GROUP=w.group_size, HAS_MIN=w.mins is not None,
                            HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                            BLOCK_K=cfg.block_k, SPLIT_K=split, PREFETCH=cfg.prefetch, EMULATE=_emulate(),
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y if split == 1 else y.to(x.dtype)
