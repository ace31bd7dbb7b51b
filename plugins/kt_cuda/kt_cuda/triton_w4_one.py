"""Int4 GEMV for 1-4 rows in ONE launch with int8 activations: ``a8one``.

``a8gemv`` (``triton_w4a8``) first rounds the activations to int8 blocks in a separate kernel, then runs the
dp4a GEMV; with split K it also needs a zeroed fp32 output and a cast back (up to four launches, ~1-2 us
each inside a CUDA graph against a ~7 us GEMV). Here a single kernel does everything:

- each program rounds the activation blocks of its own K range itself (the activations are a few KB and sit
  in L2; the programs along N repeat that work, which costs less than a launch). The rounding is that of
  ``_quant_act_kernel`` (scale ``amax/127``, round half away from zero), so the products equal
  ``a8gemv``'s: the same int8 activations meet the same int4 weights in the same order;
- split K is reduced inside the kernel through ``triton_w4_tc``'s workspace and per-tile counters (the last
  split to arrive sums the fp32 partials in split order, adds the bias, stores ``x.dtype``): deterministic;
- ``PREFETCH``: the next tile's weight words, activations and group factors are requested before this tile
  is computed; with ``EVEN_K`` (K a multiple of BLOCK_K) no load is masked (rows and tiles are clamped to
  valid ones instead), so weights and activations arrive in 16-byte vectors (sm_90 SASS: ``LDG.128``;
  ``a8gemv``'s K-masked word loads compile to 8-byte ones).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int4 import Int4Weight
from .triton_w4_tc import _finish, _split_k_launch
from .triton_int4 import _split_tiles
from .triton_w4a8 import ACT_BLOCK, _dp4a_groups, _emulate, _round_blocks


@triton.jit
def _tile_loads(q_rows, x_rows, s_rows, s_ptr, m_ptr, tile, offs_w, offs_k, offs_g, K, n_groups,
                NW: tl.constexpr, BLOCK_K: tl.constexpr, NG: tl.constexpr, ZP: tl.constexpr,
                HAS_MIN: tl.constexpr, EVEN_K: tl.constexpr):
    """K tile ``tile``: weight words ``[BLOCK_N, NW]``, activations ``[BLOCK_M, BLOCK_K]`` (float32) and
    group scales / mins ``[BLOCK_N, NG]``. Rows are clamped by the caller and ``tile`` to a valid tile, so
    with ``EVEN_K`` nothing is masked and the loads stay 16-byte vectors; otherwise only K is masked."""
    kw = tile * NW + offs_w
    k = tile * BLOCK_K + offs_k
    g = tile * NG + offs_g
    if EVEN_K:
        w = tl.load(q_rows + kw[None, :], eviction_policy="evict_first")
        x = tl.load(x_rows + k[None, :])
        s = tl.load(s_ptr + s_rows + g[None, :])
        if HAS_MIN:
            mn = tl.load(m_ptr + s_rows + g[None, :])
    else:
        w = tl.load(q_rows + kw[None, :], mask=(kw < K // 8)[None, :], other=0, eviction_policy="evict_first")
        x = tl.load(x_rows + k[None, :], mask=(k < K)[None, :], other=0.0)
        s = tl.load(s_ptr + s_rows + g[None, :], mask=(g < n_groups)[None, :], other=0.0)
        if HAS_MIN:
            mn = tl.load(m_ptr + s_rows + g[None, :], mask=(g < n_groups)[None, :], other=0.0)
    s = s.to(tl.float32)
    if HAS_MIN:
        mn = mn.to(tl.float32)
    else:
        mn = s * ZP
    return w, x.to(tl.float32), s, mn


@triton.jit
def _w4a8_one_kernel(
    x_ptr, qw_ptr, s_ptr, m_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_ym, ws_plane,
    ZP: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    PREFETCH: tl.constexpr, EVEN_K: tl.constexpr, EMULATE: tl.constexpr,
):
    """``BLOCK_M`` rows x ``BLOCK_N`` outputs per program over K split ``program_id(2)``; the dot product of
    ``_w4a8_gemv_kernel`` with the activations rounded here, per tile."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    NW: tl.constexpr = BLOCK_K // 8  # words per tile
    NB: tl.constexpr = BLOCK_K // 32  # activation blocks per tile
    NG: tl.constexpr = BLOCK_K // GROUP  # weight groups per tile
    n_tiles = tl.cdiv(K, BLOCK_K)
    t_begin, t_end = _split_tiles(n_tiles, pid_k, SPLIT_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows past M / N read the last valid row (no masks on loads) and are dropped at the store
    rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_w = tl.arange(0, NW)
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, NG)
    q_rows = qw_ptr + rows_n[:, None] * stride_qn
    s_rows = rows_n[:, None] * stride_sn
    x_rows = x_ptr + rows_m[:, None] * stride_xm
    n_groups = K // GROUP
    acc = tl.zeros([BLOCK_M, BLOCK_N, NG], dtype=tl.float32)
    # tile indices are clamped to the last tile: the prefetch past a split's end (and an empty split) read
    # valid memory whose values are never used
    w, xf, s, mn = _tile_loads(q_rows, x_rows, s_rows, s_ptr, m_ptr, tl.minimum(t_begin, n_tiles - 1), offs_w,
                               offs_k, offs_g, K, n_groups, NW, BLOCK_K, NG, ZP, HAS_MIN, EVEN_K)
    for tile in range(t_begin, t_end):
        if PREFETCH:
            w_next, x_next, s_next, mn_next = _tile_loads(q_rows, x_rows, s_rows, s_ptr, m_ptr,
                                                          tl.minimum(tile + 1, n_tiles - 1), offs_w, offs_k, offs_g,
                                                          K, n_groups, NW, BLOCK_K, NG, ZP, HAS_MIN, EVEN_K)
        xl, xh, dx, xs = _round_blocks(xf, BLOCK_M, NB, NW)
        acc += _dp4a_groups(w, xl, xh, dx, xs, s, mn, BLOCK_M, BLOCK_N, BLOCK_K, GROUP, EMULATE)
        if PREFETCH:
            w, xf, s, mn = w_next, x_next, s_next, mn_next
        else:
            w, xf, s, mn = _tile_loads(q_rows, x_rows, s_rows, s_ptr, m_ptr, tl.minimum(tile + 1, n_tiles - 1), offs_w,
                                       offs_k, offs_g, K, n_groups, NW, BLOCK_K, NG, ZP, HAS_MIN, EVEN_K)
    _finish(tl.sum(acc, axis=2), offs_m, offs_n, M, N, b_ptr, y_ptr, stride_ym, ws_ptr, ws_plane, cnt_ptr,
            pid_n, pid_m, pid_k, HAS_BIAS, SPLIT_K)


def w4a8_one_matmul(x: torch.Tensor, w: Int4Weight, bias, cfg) -> torch.Tensor:
    """``x @ w.T (+ bias)`` in ``x.dtype``, ``x`` rounded to int8 blocks of 32 inside the kernel; ``cfg``: an
    ``Int4Config`` of kernel ``a8one`` (``block_m`` rows, ``block_n`` x ``block_k`` tiles, ``split_k``)."""
    N, K = w.shape
    M = x.shape[0]
    if w.qweight.stride(-1) != 1:
        raise ValueError("int4 kernel 'a8one' reads int32 words along K: it needs N-major packed bytes "
                         "(int4.with_layout(w, k_major=False))")
    if K % ACT_BLOCK:
        raise ValueError(f"int8 activations come in blocks of {ACT_BLOCK}; got {K} features")
    if cfg.block_k % w.group_size or cfg.block_k % ACT_BLOCK:
        raise ValueError(f"block_k {cfg.block_k} must be a multiple of the group size {w.group_size} and of 32")
    if cfg.block_m not in (1, 2, 4):
        raise ValueError(f"'a8one' takes block_m 1, 2 or 4 rows per program, got {cfg.block_m}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    qw = w.qweight.view(torch.int32)
    y, grid, ws, cnt = _split_k_launch(x, N, cfg)
    mins = w.mins if w.mins is not None else w.scales
    b = bias if bias is not None else w.scales
    _w4a8_one_kernel[grid](x, qw, w.scales, mins, b, y, ws, cnt, M, N, K, x.stride(0), qw.stride(0),
                           w.scales.stride(0), y.stride(0), M * N,
                           ZP=w.zero_point, GROUP=w.group_size, HAS_MIN=w.mins is not None,
                           HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                           BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, PREFETCH=cfg.prefetch,
                           EVEN_K=K % cfg.block_k == 0, EMULATE=_emulate(),
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y

