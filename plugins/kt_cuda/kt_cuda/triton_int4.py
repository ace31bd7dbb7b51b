"""Triton kernels over the int4 layout of ``kt_cuda.int4`` (imported only where Triton exists).

Up to 16 activation rows over N-major packed bytes (``KLinearMarlin``'s default layout), the packed
bytes are read as int32 words (8 weights each, nibble ``t`` of word ``j`` = weight ``8j + t``):
- ``_w4_gemv_kernel`` (``wgemv``): CUDA cores, 1/2/4 activation rows per program share each unpacked
  tile; scale and min applied once per group and row. Used for 1-4 rows.
- ``_w4_dot_kernel`` (``wdot``): the tile expanded with one FMA per weight, then ``tl.dot``. 5-16 rows.
A nibble becomes ``1 + q/16`` by moving it into the mantissa of 1.0 (``_unit``: a shift and a LOP3).
Byte kernels, any layout (K-major bytes too) and larger batches:
- ``_int4_gemv_kernel`` / ``_int4_gemm_kernel``: one row per program column (CUDA cores) / a dequantized
  tile into ``tl.dot``; nibbles through the exponent trick (``0x4B000000 | q`` is ``2**23 + q``).
- ``_int4_to_dense_kernel``: expands the weight for torch's GEMM (large batches).
- ``_moe_int4_kernel``: the GEMM over token-expert pairs sorted by expert (``KExpertsGPU``).
- ``a8gemv`` (``triton_w4a8``): 1-4 rows rounded to int8 blocks, two ``dp4a`` per weight word (opt-in).
- ``a8one`` (``triton_w4_one``): the same product in one launch (rounding and split K inside the kernel).
- ``wtc`` (``triton_w4_tc``): 5-32 rows, tiles fed to ``tl.dot`` by plain loads that Triton's pipeliner
  stages through shared memory; split K reduced inside the kernel (one launch, output in the input dtype).
Kernels split K over a third grid axis when asked (fp32 atomics). Which kernel and tile runs is timed
once per problem among ``candidates`` (``tuned_config``; H200 sweeps in notes/h200-int4-words-2026-11-28.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from ktcore.sdk import TuneCache

from .int4 import Int4Weight


@triton.jit
def _nibble_f32(q):
    return (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _int4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, m_ptr, b_ptr, y_ptr,
    N, K, stride_xm, stride_qn, stride_qk, stride_sn, stride_ym,
    ZP: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    pid_k = tl.program_id(2)
    NG: tl.constexpr = BLOCK_K // GROUP
    GH: tl.constexpr = GROUP // 2
    n_groups = K // GROUP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_g = tl.arange(0, NG)
    tile_bytes = offs_g[:, None] * GH + tl.arange(0, GH)[None, :]
    per_split = tl.cdiv(tl.cdiv(n_groups, NG), SPLIT_K) * NG
    g_begin = pid_k * per_split
    g_end = tl.minimum(g_begin + per_split, n_groups)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    q_rows = qw_ptr + offs_n.to(tl.int64)[:, None, None] * stride_qn
    s_rows = offs_n.to(tl.int64)[:, None] * stride_sn
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g0 in range(g_begin, g_end, NG):
        g_idx = g0 + offs_g
        g_mask = g_idx < g_end
        byte = g0 * GH + tile_bytes
        q = tl.load(q_rows + byte[None, :, :] * stride_qk, mask=n_mask[:, None, None] & g_mask[None, :, None], other=0)
        x_lo = tl.load(x_row + 2 * byte, mask=g_mask[:, None], other=0.0).to(tl.float32)
        x_hi = tl.load(x_row + 2 * byte + 1, mask=g_mask[:, None], other=0.0).to(tl.float32)
        part = tl.sum(_nibble_f32(q & 0xF) * x_lo[None, :, :] + _nibble_f32(q >> 4) * x_hi[None, :, :], axis=2)
        sm = n_mask[:, None] & g_mask[None, :]
        s = tl.load(s_ptr + s_rows + g_idx[None, :], mask=sm, other=0.0).to(tl.float32)
        if HAS_MIN:
            mn = tl.load(m_ptr + s_rows + g_idx[None, :], mask=sm, other=0.0).to(tl.float32)
        else:
            mn = s * ZP
        x_sum = tl.sum(x_lo + x_hi, axis=1)
        acc += tl.sum(part * s - mn * x_sum[None, :], axis=1)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)
    y = y_ptr + row.to(tl.int64) * stride_ym + offs_n
    if SPLIT_K == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(y, acc, mask=n_mask)


@triton.jit
def _unit(w, T: tl.constexpr):
    """Nibble ``T`` of int32 words as ``1 + q/16`` (float32): the nibble is moved to mantissa bits 19..22 of
    1.0, one shift and one LOP3 (no conversion, no subtraction; ``sum(q*x) = 16*(sum(unit*x) - sum(x))``)."""
    if T <= 4:
        u = w << (19 - 4 * T)
    else:
        u = w >> (4 * T - 19)
    return ((u & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _units_natural(w, BLOCK_N: tl.constexpr, NG: tl.constexpr, GROUP: tl.constexpr):
    """``[BLOCK_N, NG, GROUP/8]`` words -> ``[BLOCK_N, NG, GROUP]`` units in K order (nibble t of word j is
    weight ``8j + t``): joins build the trailing ``[2, 2, 2]`` = ``t = c + 2d + 4e`` inside each thread."""
    c = tl.join(tl.join(tl.join(_unit(w, 0), _unit(w, 4)), tl.join(_unit(w, 2), _unit(w, 6))),
                tl.join(tl.join(_unit(w, 1), _unit(w, 5)), tl.join(_unit(w, 3), _unit(w, 7))))
    return tl.reshape(c, [BLOCK_N, NG, GROUP])


@triton.jit
def _word_tile(q_rows, s_ptr, m_ptr, s_rows, g0, offs_g, word, n_mask, g_lim,
               W: tl.constexpr, ZP: tl.constexpr, HAS_MIN: tl.constexpr):
    """The words ``[BLOCK_N, NG, W]`` of the groups from ``g0`` below ``g_lim``, with the per-group
    factors of the units: ``a = 16*scale`` and ``b = 16*scale + min`` (``w = a*unit - b``)."""
    g_mask = g0 + offs_g < g_lim
    w = tl.load(q_rows + (g0 * W + word)[None, :, :], mask=n_mask[:, None, None] & g_mask[None, :, None], other=0,
                eviction_policy="evict_first")
    sm = n_mask[:, None] & g_mask[None, :]
    a = tl.load(s_ptr + s_rows + (g0 + offs_g)[None, :], mask=sm, other=0.0).to(tl.float32) * 16.0
    if HAS_MIN:
        mn = tl.load(m_ptr + s_rows + (g0 + offs_g)[None, :], mask=sm, other=0.0).to(tl.float32)
    else:
        mn = a * (ZP / 16.0)
    return w, a, a + mn


@triton.jit
def _x_groups(x_row, elem, g0, offs_g, g_lim, GROUP: tl.constexpr):
    """Activations ``[NG, GROUP]`` of one row from group ``g0``, zeros from group ``g_lim`` on."""
    g_mask = g0 + offs_g < g_lim
    return tl.load(x_row + g0 * GROUP + elem, mask=g_mask[:, None], other=0.0)


@triton.jit
def _row_groups(units, xg, a, b):
    """Per-group contributions ``[BLOCK_N, NG]`` of one activation row: ``a*sum(unit*x) - b*sum(x)``."""
    xf = xg.to(tl.float32)
    return a * tl.sum(units * xf[None, :, :], axis=2) - b * tl.sum(xf, axis=1)[None, :]


@triton.jit
def _split_tiles(n_tiles, pid_k, SPLIT_K: tl.constexpr):
    """K tiles ``[t_begin, t_end)`` of split ``pid_k``: ``SPLIT_K`` runs of ``ceil(n_tiles / SPLIT_K)`` tiles
    (the last ones short or empty)."""
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_begin = pid_k * per_split
    return t_begin, tl.minimum(t_begin + per_split, n_tiles)


@triton.jit
def _gemv_store(y_ptr, row, stride_ym, offs_n, n_mask, acc_g, bias, M, pid_k, HAS_BIAS: tl.constexpr,
                SPLIT_K: tl.constexpr):
    out = tl.sum(acc_g, axis=1)
    if HAS_BIAS:
        out += tl.where(pid_k == 0, bias, 0.0)
    y = y_ptr + row.to(tl.int64) * stride_ym + offs_n
    mask = n_mask & (row + tl.zeros_like(offs_n) < M)  # a vector compare: Triton 3.9's interpreter mis-types bool & scalar
    if SPLIT_K == 1:
        tl.store(y, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y, out, mask=mask)


@triton.jit
def _store_rows(y_ptr, stride_ym, offs_m, m_mask, offs_n, n_mask, out, b_ptr, pid_k, HAS_BIAS: tl.constexpr,
                SPLIT_K: tl.constexpr):
    """Epilogue of a ``[BLOCK_M, BLOCK_N]`` float32 tile: bias (first K split only), then a store in the
    output dtype, or an fp32 atomic add into a zeroed output when K is split."""
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        out += tl.where(pid_k == 0, bias, 0.0)[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    ym = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y, out.to(y_ptr.dtype.element_ty), mask=ym)
    else:
        tl.atomic_add(y, out, mask=ym)


@triton.jit
def _w4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, m_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
    ZP: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """CUDA cores, ``BLOCK_M`` (1, 2 or 4) activation rows per program sharing each unpacked weight tile.

    Weights are read as int32 words (``stride_qn`` counts words; 16-byte vectors along K) and unpacked to
    ``1 + q/16`` units in K order. Per group, ``sum(q*x)`` comes from the units, so scale and min are
    applied once per group and row; per-group sums stay ``[BLOCK_N, groups]`` wide and are reduced across
    threads once, at the end. ``PREFETCH``: the next tile's words, factors and activations are requested
    before this tile is computed (two tiles in flight per program; Triton's pipeliner does not overlap
    these loads by itself)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    NG: tl.constexpr = BLOCK_K // GROUP
    W: tl.constexpr = GROUP // 8
    n_groups = K // GROUP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_g = tl.arange(0, NG)
    word = offs_g[:, None] * W + tl.arange(0, W)[None, :]  # [NG, W] word index in the tile
    elem = offs_g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [NG, GROUP]
    n_tiles = tl.cdiv(n_groups, NG)
    t_begin, t_end = _split_tiles(n_tiles, pid_k, SPLIT_K)
    q_rows = qw_ptr + offs_n.to(tl.int64)[:, None, None] * stride_qn
    s_rows = offs_n.to(tl.int64)[:, None] * stride_sn
    row0 = pid_m * BLOCK_M
    xr = x_ptr + row0.to(tl.int64) * stride_xm
    # masks are built from group limits (0: read nothing), not by AND-ing scalar flags into them
    g_lim = tl.where(t_begin < t_end, n_groups, 0)
    g0 = t_begin * NG
    w, a, b = _word_tile(q_rows, s_ptr, m_ptr, s_rows, g0, offs_g, word, n_mask, g_lim, W, ZP, HAS_MIN)
    x0 = _x_groups(xr, elem, g0, offs_g, tl.where(row0 < M, g_lim, 0), GROUP)
    acc0 = tl.zeros([BLOCK_N, NG], dtype=tl.float32)
    if BLOCK_M > 1:
        x1 = _x_groups(xr + stride_xm, elem, g0, offs_g, tl.where(row0 + 1 < M, g_lim, 0), GROUP)
        acc1 = tl.zeros([BLOCK_N, NG], dtype=tl.float32)
    if BLOCK_M > 2:
        x2 = _x_groups(xr + 2 * stride_xm, elem, g0, offs_g, tl.where(row0 + 2 < M, g_lim, 0), GROUP)
        x3 = _x_groups(xr + 3 * stride_xm, elem, g0, offs_g, tl.where(row0 + 3 < M, g_lim, 0), GROUP)
        acc2 = tl.zeros([BLOCK_N, NG], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_N, NG], dtype=tl.float32)
    for tile in range(t_begin, t_end):
        gn = (tile + 1) * NG
        n_lim = tl.where(tile + 1 < t_end, n_groups, 0)
        if PREFETCH:
            wn, an, bn = _word_tile(q_rows, s_ptr, m_ptr, s_rows, gn, offs_g, word, n_mask, n_lim, W, ZP, HAS_MIN)
            xn0 = _x_groups(xr, elem, gn, offs_g, tl.where(row0 < M, n_lim, 0), GROUP)
            if BLOCK_M > 1:
                xn1 = _x_groups(xr + stride_xm, elem, gn, offs_g, tl.where(row0 + 1 < M, n_lim, 0), GROUP)
            if BLOCK_M > 2:
                xn2 = _x_groups(xr + 2 * stride_xm, elem, gn, offs_g, tl.where(row0 + 2 < M, n_lim, 0), GROUP)
                xn3 = _x_groups(xr + 3 * stride_xm, elem, gn, offs_g, tl.where(row0 + 3 < M, n_lim, 0), GROUP)
        units = _units_natural(w, BLOCK_N, NG, GROUP)
        acc0 += _row_groups(units, x0, a, b)
        if BLOCK_M > 1:
            acc1 += _row_groups(units, x1, a, b)
        if BLOCK_M > 2:
            acc2 += _row_groups(units, x2, a, b)
            acc3 += _row_groups(units, x3, a, b)
        if PREFETCH:
            w, a, b, x0 = wn, an, bn, xn0
            if BLOCK_M > 1:
                x1 = xn1
            if BLOCK_M > 2:
                x2, x3 = xn2, xn3
        else:
            w, a, b = _word_tile(q_rows, s_ptr, m_ptr, s_rows, gn, offs_g, word, n_mask, n_lim, W, ZP, HAS_MIN)
            x0 = _x_groups(xr, elem, gn, offs_g, tl.where(row0 < M, n_lim, 0), GROUP)
            if BLOCK_M > 1:
                x1 = _x_groups(xr + stride_xm, elem, gn, offs_g, tl.where(row0 + 1 < M, n_lim, 0), GROUP)
            if BLOCK_M > 2:
                x2 = _x_groups(xr + 2 * stride_xm, elem, gn, offs_g, tl.where(row0 + 2 < M, n_lim, 0), GROUP)
                x3 = _x_groups(xr + 3 * stride_xm, elem, gn, offs_g, tl.where(row0 + 3 < M, n_lim, 0), GROUP)
    bias = None
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    _gemv_store(y_ptr, row0, stride_ym, offs_n, n_mask, acc0, bias, M, pid_k, HAS_BIAS, SPLIT_K)
    if BLOCK_M > 1:
        _gemv_store(y_ptr, row0 + 1, stride_ym, offs_n, n_mask, acc1, bias, M, pid_k, HAS_BIAS, SPLIT_K)
    if BLOCK_M > 2:
        _gemv_store(y_ptr, row0 + 2, stride_ym, offs_n, n_mask, acc2, bias, M, pid_k, HAS_BIAS, SPLIT_K)
        _gemv_store(y_ptr, row0 + 3, stride_ym, offs_n, n_mask, acc3, bias, M, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _w4_dot_kernel(
    x_ptr, qw_ptr, s_ptr, m_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
    ZP: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    PREFETCH: tl.constexpr, SWAP: tl.constexpr,
):
    """Tensor cores over int32-word weights: a weight tile is expanded in K order (``a*unit - b``, one FMA)
    to the activation dtype and multiplied with ``tl.dot``. ``SWAP``: the weight is the left operand
    (``[BLOCK_N, BLOCK_M]`` accumulator). ``PREFETCH`` as in ``_w4_gemv_kernel``."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    NG: tl.constexpr = BLOCK_K // GROUP
    W: tl.constexpr = GROUP // 8
    n_groups = K // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_g = tl.arange(0, NG)
    word = offs_g[:, None] * W + tl.arange(0, W)[None, :]
    offs_k = tl.arange(0, BLOCK_K)
    n_tiles = tl.cdiv(n_groups, NG)
    t_begin, t_end = _split_tiles(n_tiles, pid_k, SPLIT_K)
    q_rows = qw_ptr + offs_n.to(tl.int64)[:, None, None] * stride_qn
    s_rows = offs_n.to(tl.int64)[:, None] * stride_sn
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    g_lim = tl.where(t_begin < t_end, n_groups, 0)  # 0: read nothing
    g0 = t_begin * NG
    w, a, b = _word_tile(q_rows, s_ptr, m_ptr, s_rows, g0, offs_g, word, n_mask, g_lim, W, ZP, HAS_MIN)
    x = tl.load(x_rows + g0 * GROUP + offs_k[None, :], mask=m_mask[:, None] & (g0 * GROUP + offs_k < g_lim * GROUP)[None, :],
                other=0.0)
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in range(t_begin, t_end):
        gn = (tile + 1) * NG
        n_lim = tl.where(tile + 1 < t_end, n_groups, 0)
        xmn = m_mask[:, None] & (gn * GROUP + offs_k < n_lim * GROUP)[None, :]
        if PREFETCH:
            wn, an, bn = _word_tile(q_rows, s_ptr, m_ptr, s_rows, gn, offs_g, word, n_mask, n_lim, W, ZP, HAS_MIN)
            xn = tl.load(x_rows + gn * GROUP + offs_k[None, :], mask=xmn, other=0.0)
        wt = tl.reshape(a[:, :, None] * _units_natural(w, BLOCK_N, NG, GROUP) - b[:, :, None], [BLOCK_N, BLOCK_K])
        if SWAP:
            acc = tl.dot(wt.to(x.dtype), tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(wt.to(x.dtype)), acc)
        if PREFETCH:
            w, a, b, x = wn, an, bn, xn
        else:
            w, a, b = _word_tile(q_rows, s_ptr, m_ptr, s_rows, gn, offs_g, word, n_mask, n_lim, W, ZP, HAS_MIN)
            x = tl.load(x_rows + gn * GROUP + offs_k[None, :], mask=xmn, other=0.0)
    if SWAP:
        out = tl.trans(acc)
    else:
        out = acc
    _store_rows(y_ptr, stride_ym, offs_m, m_mask, offs_n, n_mask, out, b_ptr, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _int4_to_dense_kernel(qw_ptr, s_ptr, m_ptr, y_ptr, N, K, stride_qn, stride_qk, stride_sn, stride_yn,
                          ZP: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Expand an int4 weight to a dense ``[N, K]`` tensor (for large batches, then a library GEMM)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    byte = tl.load(qw_ptr + rows * stride_qn + (offs_k[None, :] // 2) * stride_qk, mask=mask, other=0)
    q = ((byte >> ((offs_k[None, :] % 2) * 4)) & 0xF).to(tl.float32)
    s = tl.load(s_ptr + rows * stride_sn + offs_k[None, :] // GROUP, mask=mask, other=0.0).to(tl.float32)
    if HAS_MIN:
        mn = tl.load(m_ptr + rows * stride_sn + offs_k[None, :] // GROUP, mask=mask, other=0.0).to(tl.float32)
    else:
        mn = s * ZP
    tl.store(y_ptr + rows * stride_yn + offs_k[None, :], (s * q - mn).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_tile(q_rows, stride_qk, s_ptr, m_ptr, s_rows, g0, g_idx, g_mask, n_mask, tile_bytes,
                  ZP: tl.constexpr, GH: tl.constexpr, HAS_MIN: tl.constexpr,
                  BLOCK_N: tl.constexpr, HALF: tl.constexpr):
    """Weights of one K tile (float32) as two ``[BLOCK_N, BLOCK_K/2]`` halves: even and odd K positions."""
    byte = g0 * GH + tile_bytes
    q = tl.load(q_rows + byte[None, :, :] * stride_qk, mask=n_mask[:, None, None] & g_mask[None, :, None], other=0)
    sm = n_mask[:, None] & g_mask[None, :]
    s = tl.load(s_ptr + s_rows + g_idx[None, :], mask=sm, other=0.0).to(tl.float32)
    if HAS_MIN:
        mn = tl.load(m_ptr + s_rows + g_idx[None, :], mask=sm, other=0.0).to(tl.float32)
    else:
        mn = s * ZP
    s3 = s[:, :, None]
    m3 = mn[:, :, None]
    w_even = tl.reshape(_nibble_f32(q & 0xF) * s3 - m3, [BLOCK_N, HALF])
    w_odd = tl.reshape(_nibble_f32(q >> 4) * s3 - m3, [BLOCK_N, HALF])
    return w_even, w_odd


@triton.jit
def _int4_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, m_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_qn, stride_qk, stride_sn, stride_ym,
    ZP: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    NG: tl.constexpr = BLOCK_K // GROUP
    GH: tl.constexpr = GROUP // 2
    HALF: tl.constexpr = BLOCK_K // 2
    n_groups = K // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_g = tl.arange(0, NG)
    offs_h = tl.arange(0, HALF)
    tile_bytes = offs_g[:, None] * GH + tl.arange(0, GH)[None, :]
    per_split = tl.cdiv(tl.cdiv(n_groups, NG), SPLIT_K) * NG
    g_begin = pid_k * per_split
    g_end = tl.minimum(g_begin + per_split, n_groups)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    q_rows = qw_ptr + offs_n.to(tl.int64)[:, None, None] * stride_qn
    s_rows = offs_n.to(tl.int64)[:, None] * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g0 in range(g_begin, g_end, NG):
        g_idx = g0 + offs_g
        g_mask = g_idx < g_end
        w_even, w_odd = _dequant_tile(q_rows, stride_qk, s_ptr, m_ptr, s_rows, g0, g_idx, g_mask, n_mask, tile_bytes,
                                      ZP, GH, HAS_MIN, BLOCK_N, HALF)
        k_even = g0 * GROUP + 2 * offs_h
        xm = m_mask[:, None] & (k_even < g_end * GROUP)[None, :]
        x_even = tl.load(x_rows + k_even[None, :], mask=xm, other=0.0)
        x_odd = tl.load(x_rows + k_even[None, :] + 1, mask=xm, other=0.0)
        acc = tl.dot(x_even, tl.trans(w_even.to(x_even.dtype)), acc)
        acc = tl.dot(x_odd, tl.trans(w_odd.to(x_odd.dtype)), acc)
    _store_rows(y_ptr, stride_ym, offs_m, m_mask, offs_n, n_mask, acc, b_ptr, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _moe_int4_kernel(
    x_ptr, qw_ptr, s_ptr, m_ptr, y_ptr, pair_ptr, block_expert_ptr,
    num_pairs, N, K, x_row_div, stride_xm, stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_ym,
    ZP: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Rows of one block belong to one expert; row r reads activation row ``pair // x_row_div``
    (the token, for the first GEMM) and writes output row ``pair``."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_b)
    if expert >= 0:
        NG: tl.constexpr = BLOCK_K // GROUP
        GH: tl.constexpr = GROUP // 2
        HALF: tl.constexpr = BLOCK_K // 2
        n_groups = K // GROUP
        pairs = tl.load(pair_ptr + pid_b * BLOCK_M + tl.arange(0, BLOCK_M))
        m_mask = pairs < num_pairs
        src_rows = tl.where(m_mask, pairs // x_row_div, 0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_g = tl.arange(0, NG)
        offs_h = tl.arange(0, HALF)
        tile_bytes = offs_g[:, None] * GH + tl.arange(0, GH)[None, :]
        e64 = expert.to(tl.int64)
        x_rows = x_ptr + src_rows.to(tl.int64)[:, None] * stride_xm
        q_rows = qw_ptr + e64 * stride_qe + offs_n.to(tl.int64)[:, None, None] * stride_qn
        s_rows = e64 * stride_se + offs_n.to(tl.int64)[:, None] * stride_sn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g0 in range(0, n_groups, NG):
            g_idx = g0 + offs_g
            g_mask = g_idx < n_groups
            w_even, w_odd = _dequant_tile(q_rows, stride_qk, s_ptr, m_ptr, s_rows, g0, g_idx, g_mask, n_mask, tile_bytes,
                                          ZP, GH, HAS_MIN, BLOCK_N, HALF)
            k_even = g0 * GROUP + 2 * offs_h
            xm = m_mask[:, None] & (k_even < K)[None, :]
            x_even = tl.load(x_rows + k_even[None, :], mask=xm, other=0.0)
            x_odd = tl.load(x_rows + k_even[None, :] + 1, mask=xm, other=0.0)
            acc = tl.dot(x_even, tl.trans(w_even.to(x_even.dtype)), acc)
            acc = tl.dot(x_odd, tl.trans(w_odd.to(x_odd.dtype)), acc)
        y = y_ptr + pairs.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_dense_kernel(
    x_ptr, w_ptr, y_ptr, pair_ptr, block_expert_ptr,
    num_pairs, N, K, x_row_div, stride_xm, stride_we, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """As ``_moe_int4_kernel`` over plain ``[E, N, K]`` weights (GGML types that are not 4-bit)."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_b)
    if expert >= 0:
        pairs = tl.load(pair_ptr + pid_b * BLOCK_M + tl.arange(0, BLOCK_M))
        m_mask = pairs < num_pairs
        src_rows = tl.where(m_mask, pairs // x_row_div, 0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + src_rows.to(tl.int64)[:, None] * stride_xm
        w_rows = w_ptr + expert.to(tl.int64) * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < K
            x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(x.dtype)
            acc = tl.dot(x, tl.trans(w), acc)
        y = y_ptr + pairs.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# --- launch ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int4Config:
    """One launch. ``kernel``: ``wgemv`` (CUDA cores over int32 words, ``block_m`` rows per program sharing
    each unpacked tile), ``wdot`` (tensor cores over int32 words, ``block_m`` >= 16 rows), ``gemv`` / ``gemm``
    (the byte-load kernels: any layout, K-major bytes too), ``dense`` (expand the weight, then torch's
    GEMM), ``a8gemv`` (``triton_w4a8``), ``a8one`` (``triton_w4_one``: ``a8gemv`` in one launch,
    split K reduced inside) or ``wtc``
    (``triton_w4_tc``: pipelined tensor-core tiles for 5-32 rows, split K reduced inside the kernel; ``unpack``: ``f32`` / ``half``, see there).
    ``prefetch`` / ``swap``: see ``_w4_gemv_kernel`` and ``_w4_dot_kernel``. The word kernels need N-major
    packed bytes."""

    kernel: str
    block_n: int = 32
    block_k: int = 512
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    block_m: int = 16
    prefetch: bool = True
    swap: bool = False
    unpack: str = "f32"

    def label(self) -> str:
        if self.kernel == "dense":
            return "dense"
        name = self.kernel
        if self.kernel == "wtc":
            name += f"{_UNPACK_TAG[self.unpack]}{'T' if self.swap else ''}"
        elif self.kernel in (*WORD_KERNELS, "a8gemv", "a8one"):
            name += f"{'' if self.prefetch else '0'}{'T' if self.swap else ''}"
        m = f"m{self.block_m}" if self.kernel != "gemv" else ""
        return f"{name}:{m}n{self.block_n}k{self.block_k}s{self.split_k}w{self.num_warps}st{self.num_stages}"


WORD_KERNELS = ("wgemv", "wdot")
_UNPACK_TAG = {"f32": "", "half": "H"}  # wtc labels: wtc / wtcH (+T: swapped operands)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _byte_candidates(M: int) -> list["Int4Config"]:
    """The byte-kernel configs (any layout) of the earlier H200 sweeps (notes/h200-2026-11-28.md)."""
    C = Int4Config
    if M == 1:
        return [C("gemv", 32, 512, 4), C("gemv", 16, 256, 4), C("gemv", 64, 512, 2, 8), C("gemm", 64, 128, 4)]
    if M <= 16:
        out = [C("gemm", 64, 128, 4), C("gemm", 128, 128, 4), C("gemm", 64, 256, 4), C("gemm", 32, 128, 4)]
        return out + ([C("gemv", 32, 512, 4)] if M <= 2 else [])
    if M < 256:
        return [C("gemm", 64, 128, 2, block_m=64), C("gemm", 128, 128, 1, block_m=64), C("gemm", 64, 128, 1, block_m=64),
                C("dense")]
    return [C("dense"), C("gemm", 128, 128, 1, 8, block_m=128), C("gemm", 128, 128, 1, block_m=64)]


def candidates(M: int, group_size: int, k_major: bool = False, act_int8: bool = False) -> list[Int4Config]:
    """Configs worth timing for ``M`` rows, most likely first (H200 sweeps, ``bench_marlin.py --kernels``:
    notes/h200-int4-words-2026-11-28.md, h200-int4-one-wtc-2026-11-29.md). N-major bytes: 1-4 rows run
    ``wgemv``, 5-16 ``wtc`` then ``wdot``, 17-32 the byte kernels then ``wtc`` (not swept); K-major bytes and
    larger batches keep the byte kernels / dense expansion. ``act_int8``: up to 4 rows round the activations
    to int8 blocks (``a8one``, then ``a8gemv``: the fastest at 1-4 rows on an H200)."""
    C = Int4Config
    if act_int8 and not k_major and M <= 4:
        # one launch (rounding and split K inside) first: the fastest at 1 and 4 rows on all three shapes of
        # the H200 sweep (notes/h200-int4-one-wtc-2026-11-29.md), then the two-launch a8gemv tiles
        bm = _pow2_at_least(M)
        out = a8one_candidates(M)
        out += [C("a8gemv", bn, bk, 1, nw, 3, block_m=bm, prefetch=pf) for bn, bk, nw, pf in
                [(8, 1024, 8, False), (4, 1024, 4, False), (16, 512, 8, False), (8, 512, 4, False)]]
    elif k_major or M > 32:
        out = _byte_candidates(M)
    elif M > 16:  # the byte GEMM tiles of 17-255 rows, then the pipelined tensor-core kernel (not yet swept)
        out = _byte_candidates(M) + wtc_candidates(M)
    elif M == 1:  # graph-timed, weights past L2: each within 3% of the best on the three shapes
        out = [C("wgemv", 4, 1024, 1, 2, 3, block_m=1), C("wgemv", 8, 1024, 1, 4, 3, block_m=1),
               C("wgemv", 16, 512, 1, 4, 3, block_m=1)]
    elif M <= 4:  # n8k512 fastest at 4 rows on all three shapes
        bm = _pow2_at_least(M)
        out = [C("wgemv", 8, 512, 1, 4, 3, block_m=bm), C("wgemv", 16, 512, 1, 4, 3, block_m=bm)]
    else:  # wtc first: 1.4-1.7x wdot at 16 rows on the three shapes of the H200 sweep; wdot after
        out = wtc_candidates(M) + [C("wdot", 32, 256, 2, 4, 3, block_m=16),
                                   C("wdot", 64, 256, 1, 4, 3, block_m=16, swap=True)]
    return [c for c in out if c.kernel == "dense" or c.block_k % group_size == 0] or [C("dense")]


def a8one_candidates(M: int) -> list[Int4Config]:
    """``a8one`` tiles for 1-4 rows (``triton_w4_one``: activations rounded inside the GEMV, split K reduced
    inside; one launch), best first in the H200 sweep."""
    C = Int4Config
    bm = _pow2_at_least(M)
    if M == 1:  # n8k1024 best on all three shapes (1.82-1.96x fp16), the others within 10 %
        tiles = [(8, 1024, 1, 4), (16, 1024, 1, 8), (16, 512, 1, 4), (32, 1024, 2, 8)]
    else:  # 4 rows: n16 tiles best, split 2 on the long K
        tiles = [(16, 1024, 1, 8), (16, 512, 1, 8), (32, 512, 2, 8), (8, 1024, 1, 4)]
    return [C("a8one", bn, bk, sk, nw, 3, block_m=bm, prefetch=True) for bn, bk, sk, nw in tiles]


def wtc_candidates(M: int) -> list[Int4Config]:
    """``wtc`` tiles for 5-32 rows (pipelined tensor-core kernel, ``triton_w4_tc``). At 16 rows on an H200
    (``bench_marlin.py --kernels``) the swapped 64x128 tile with split K 8 won on all three shapes, the f32
    and half unpacks within 5 % of each other; the per-group dot lost everywhere. 17-32 rows: not swept."""
    C = Int4Config
    bm = 16 if M <= 16 else 32
    return [C("wtc", 64, 128, 8, 4, 4, block_m=bm, swap=True, unpack="f32"),
            C("wtc", 64, 128, 8, 4, 4, block_m=bm, swap=True, unpack="half"),
            C("wtc", 64, 256, 4, 4, 4, block_m=bm, swap=True, unpack="half"),
            C("wtc", 32, 256, 2, 4, 4, block_m=bm, unpack="half")]


def default_config(M: int, N: int, K: int, group_size: int, device: torch.device, k_major: bool = False,
                   act_int8: bool = False) -> Int4Config:
    """The first candidate: what runs without tuning (Triton's interpreter, ``KT_CUDA_AUTOTUNE=0``)."""
    return candidates(M, group_size, k_major, act_int8)[0]


def _m_bucket(M: int) -> int:
    return M if M <= 16 else (32 if M <= 32 else (64 if M < 256 else 256))


_TUNE_CACHES: dict[int, TuneCache] = {}


def tune_cache(device: torch.device) -> TuneCache:
    """The autotune choices of ``device``'s GPU model (``ktcore.sdk.TuneCache``: kept on disk, so the next
    process starts tuned)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _TUNE_CACHES:
        major, minor = torch.cuda.get_device_capability(index)
        name = f"{torch.cuda.get_device_name(index)} sm{major}{minor} triton{triton.__version__} cuda{torch.version.cuda}"
        _TUNE_CACHES[index] = TuneCache("kt-cuda-int4", name)
    return _TUNE_CACHES[index]


def tuned_config(x: torch.Tensor, w: Int4Weight, bias, act_int8: bool = False) -> Int4Config:
    """The fastest candidate for this problem, timed once per (rows bucket, shape, format) and GPU model; the
    choice is kept on disk (``tune_cache``), so later processes on the same GPU model do not time again.

    Off with ``KT_CUDA_AUTOTUNE=0`` (then the first candidate); never tunes inside CUDA-graph capture.
    """
    import os

    M = x.shape[0]
    N, K = w.shape
    from .int4 import is_k_major

    cands = candidates(M, w.group_size, is_k_major(w), act_int8)
    if (x.device.type != "cuda" or len(cands) == 1 or os.environ.get("KT_CUDA_AUTOTUNE", "1") == "0"
            or torch.cuda.is_current_stream_capturing()):
        return cands[0]
    from triton.testing import do_bench

    problem = (_m_bucket(M), N, K, w.group_size, w.mins is not None, str(w.scales.dtype), w.qweight.stride(-1),
               str(x.dtype), act_int8)
    return tune_cache(x.device).choice(problem, cands,
                                       lambda c: do_bench(lambda: _launch(x, w, bias, c), warmup=5, rep=20))


def int4_to_dense(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The 2-D int4 weight expanded to ``dtype`` (one Triton pass over K-major bytes).

    On an H200 the expansion from K-major bytes measured 5-6x faster than from N-major ones (dense
    path at 256 rows, 4096x14336: 123 us against 777 us), so N-major bytes are transposed first
    (a temporary copy of the packed bytes; the combination itself was not timed)."""
    from .int4 import is_k_major, with_layout

    if not is_k_major(w):
        w = with_layout(w, True)
    N, K = w.shape
    y = torch.empty((N, K), device=w.qweight.device, dtype=dtype)
    mins = w.mins if w.mins is not None else w.scales
    grid = (triton.cdiv(N, 32), triton.cdiv(K, 256))
    _int4_to_dense_kernel[grid](w.qweight, w.scales, mins, y, N, K, w.qweight.stride(0), w.qweight.stride(1),
                                w.scales.stride(0), y.stride(0),
                                ZP=w.zero_point, GROUP=w.group_size, HAS_MIN=w.mins is not None,
                                BLOCK_N=32, BLOCK_K=256, num_warps=4)
    return y


def _launch(x: torch.Tensor, w: Int4Weight, bias, cfg: Int4Config) -> torch.Tensor:
    N, K = w.shape
    M = x.shape[0]
    if cfg.kernel == "dense":
        y = torch.nn.functional.linear(x, int4_to_dense(w, x.dtype))
        return y + bias.to(y.dtype) if bias is not None else y
    if cfg.kernel == "a8gemv":
        from .triton_w4a8 import w4a8_matmul

        return w4a8_matmul(x, w, bias, cfg)
    if cfg.kernel == "a8one":
        from .triton_w4_one import w4a8_one_matmul

        return w4a8_one_matmul(x, w, bias, cfg)
    if cfg.kernel == "wtc":
        from .triton_w4_tc import w4_tc_matmul

        return w4_tc_matmul(x, w, bias, cfg)
    if cfg.block_k % w.group_size:
        raise ValueError(f"block_k {cfg.block_k} must be a multiple of the group size {w.group_size}")
    split = cfg.split_k
    y = (torch.zeros if split > 1 else torch.empty)((M, N), device=x.device, dtype=torch.float32 if split > 1 else x.dtype)
    mins = w.mins if w.mins is not None else w.scales
    b = bias if bias is not None else w.scales
    common = dict(ZP=w.zero_point, GROUP=w.group_size, HAS_MIN=w.mins is not None, HAS_BIAS=bias is not None,
                  BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.kernel in WORD_KERNELS:
        if w.qweight.stride(-1) != 1:
            raise ValueError(f"int4 kernel {cfg.kernel!r} reads int32 words along K: it needs N-major packed bytes "
                             "(int4.with_layout(w, k_major=False)); use 'gemv'/'gemm' for K-major ones")
        qw = w.qweight.view(torch.int32)
        if cfg.kernel == "wgemv" and cfg.block_m not in (1, 2, 4):
            raise ValueError(f"wgemv takes block_m 1, 2 or 4 rows per program, got {cfg.block_m}")
        word_common = dict(common, BLOCK_M=cfg.block_m, PREFETCH=cfg.prefetch)
        grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m), split)
        args = (x, qw, w.scales, mins, b, y, M, N, K, x.stride(0), qw.stride(0), w.scales.stride(0), y.stride(0))
        if cfg.kernel == "wgemv":
            _w4_gemv_kernel[grid](*args, **word_common)
        else:
            _w4_dot_kernel[grid](*args, SWAP=cfg.swap, **word_common)
        return y if split == 1 else y.to(x.dtype)
    strides = (w.qweight.stride(0), w.qweight.stride(1), w.scales.stride(0), y.stride(0))
    if cfg.kernel == "gemv":
        grid = (triton.cdiv(N, cfg.block_n), M, split)
        _int4_gemv_kernel[grid](x, w.qweight, w.scales, mins, b, y, N, K, x.stride(0), *strides, **common)
    elif cfg.kernel == "gemm":
        grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m), split)
        _int4_gemm_kernel[grid](x, w.qweight, w.scales, mins, b, y, M, N, K, x.stride(0), *strides,
                                BLOCK_M=cfg.block_m, **common)
    else:
        raise ValueError(f"unknown int4 kernel {cfg.kernel!r}; kernels: wgemv, wdot, wtc, a8gemv, a8one, gemv, "
                         "gemm, dense")
    return y if split == 1 else y.to(x.dtype)


def int4_matmul(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None, config: Int4Config | None = None,
                act_int8: bool = False) -> torch.Tensor:
    """``x [M, K] @ w.T + bias`` for a 2-D ``Int4Weight`` ``[N, K]``; result in ``x.dtype``.

    Without ``config`` the kernel and tile are autotuned per problem (see ``tuned_config``); ``act_int8``
    lets up to 4 rows be rounded to int8 activation blocks first (``triton_w4a8``)."""
    if x.dim() != 2:
        raise ValueError(f"int4_matmul wants a 2-D activation, got shape {tuple(x.shape)}")
    N, K = w.shape
    if x.shape[1] != K:
        raise ValueError(f"activation has {x.shape[1]} features, weight expects {K}")
    x = x.contiguous()
    return _launch(x, w, bias, config or tuned_config(x, w, bias, act_int8))


# --- MoE ---------------------------------------------------------------------------------------------


def align_pairs(top_k_index: torch.Tensor, num_experts: int, block_m: int):
    """Sort token-expert pairs by expert, each expert's run padded to a multiple of ``block_m``.

    Returns ``pair_ids`` (pair index or ``num_pairs`` for padding, length ``blocks*block_m``) and
    ``block_expert`` (expert of each block, -1 past the end). Sized by an upper bound, so no host sync.
    """
    flat = top_k_index.reshape(-1).to(torch.int64)
    P = flat.numel()
    dev = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    e_sorted = flat[order]
    rank = torch.arange(P, device=dev) - start[e_sorted]
    blocks = triton.cdiv(P, block_m) + min(P, num_experts)
    pair_ids = torch.full((blocks * block_m,), P, dtype=torch.int32, device=dev)
    pair_ids[pad_start[e_sorted] + rank] = order.to(torch.int32)
    block_start = torch.arange(blocks, device=dev, dtype=torch.int64) * block_m
    block_expert = torch.searchsorted(pad_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return pair_ids, block_expert


def moe_matmul(x: torch.Tensor, w, pair_ids, block_expert, num_pairs: int, x_row_div: int, block_m: int,
               block_n: int = 64, block_k: int | None = None, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """``y[p] = x[p // x_row_div] @ W[expert(p)].T`` for every pair ``p``; ``w`` an ``Int4Weight``
    ``[E, N, K]`` or a plain tensor ``[E, N, K]``."""
    x = x.contiguous()
    if isinstance(w, Int4Weight):
        E, N, K = w.shape
        bk = block_k or max(128, w.group_size)
        y = torch.empty((num_pairs, N), device=x.device, dtype=x.dtype)
        mins = w.mins if w.mins is not None else w.scales
        grid = (block_expert.numel(), triton.cdiv(N, block_n))
        _moe_int4_kernel[grid](x, w.qweight, w.scales, mins, y, pair_ids, block_expert,
                               num_pairs, N, K, x_row_div, x.stride(0),
                               w.qweight.stride(0), w.qweight.stride(1), w.qweight.stride(2), w.scales.stride(0), w.scales.stride(1), y.stride(0),
                               ZP=w.zero_point, GROUP=w.group_size, HAS_MIN=w.mins is not None,
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=bk, num_warps=num_warps, num_stages=num_stages)
        return y
    E, N, K = w.shape
    y = torch.empty((num_pairs, N), device=x.device, dtype=x.dtype)
    grid = (block_expert.numel(), triton.cdiv(N, block_n))
    _moe_dense_kernel[grid](x, w, y, pair_ids, block_expert, num_pairs, N, K, x_row_div,
                            x.stride(0), w.stride(0), w.stride(1), y.stride(0),
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k or 64, num_warps=num_warps, num_stages=num_stages)
    return y
