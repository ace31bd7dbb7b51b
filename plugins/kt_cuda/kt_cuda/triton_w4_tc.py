"""Tensor-core int4 weight-only GEMM for 5-32 activation rows (the ``wtc`` kernel of ``Int4Config``).

At 16 rows the product is still bound by memory traffic (the int4 weight with group-32 fp16 scales and
mins is ~3.2x fewer bytes than fp16), so the kernel is built to keep many weight bytes in flight:

- plain loads of the K tile indexed by the loop counter only (no register prefetch), so that Triton's
  software pipeliner turns them into ``num_stages`` asynchronous copies into shared memory;
- weights read as int32 words along K (N-major packed bytes ``[N, K/2]`` viewed as ``[N, K/8]``, nibble
  ``t`` of word ``j`` = weight ``8j + t``), joined back into K order inside each thread;
- split K without extra launches: each split stores its fp32 partial tile into a workspace, the last split
  to arrive at an output tile (an atomic counter per tile) sums the partials in split order, adds the bias,
  stores the result in the activation dtype and resets the counter to 0 (so the counters stay zeroed for
  the next launch: one kernel per call, no memset, no cast, deterministic sums);
- ``SWAP``: the weight tile is the left ``tl.dot`` operand (``[BLOCK_N, BLOCK_K] x [BLOCK_K, BLOCK_M]``):
  64+ weight rows per warp group can use Hopper's wgmma with the small activation side as its N.

Two ways from nibbles to the tensor-core operand (``UNPACK``):

- ``0`` (``f32``): a nibble moved into the mantissa of 1.0 (``1 + q/16``, ``triton_int4._unit``), one
  float32 FMA with the group factors, rounded to the activation dtype (as ``wdot``, the most exact);
- ``1`` (``half``): the "magic number" expansion in the activation dtype: ``q | 0x6400`` is the float16
  ``1024 + q`` (``q | 0x4300`` the bfloat16 ``128 + q``), so integer ops alone give the value; then
  ``(v - 1024) * scale - min`` in float16 (the subtraction is exact; one rounding per multiply/add).

(A third, scale and min applied after one small ``tl.dot`` per group of 32, ran at 0.31-0.55x fp16 on an
H200 against 0.72-0.91x for these, and was removed.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int4 import Int4Weight
from .triton_int4 import _split_tiles, _units_natural

UNPACKS = {"f32": 0, "half": 1}


@triton.jit
def _magic_pair(w, T: tl.constexpr, MAGIC: tl.constexpr, DT: tl.constexpr):
    """Nibbles ``T`` and ``T + 4`` of int32 words as ``BIAS + q`` in ``DT``, from one shift and one AND/OR
    that fill both 16-bit halves of a register (``0x000F000F``, ``MAGIC * 0x10001``)."""
    v = ((w >> (4 * T)) & 0x000F000F) | (MAGIC * 0x10001)
    return v.to(tl.int16).to(DT, bitcast=True), (v >> 16).to(tl.int16).to(DT, bitcast=True)


@triton.jit
def _magic_natural(w, MAGIC: tl.constexpr, DT: tl.constexpr):
    """Words ``[..., W]`` -> ``[..., W, 2, 2, 2]`` values ``BIAS + q`` whose trailing three indices
    ``(i, s, r)`` are nibble ``4i + 2s + r``: flattened, the weights of each word in K order."""
    h0, h4 = _magic_pair(w, 0, MAGIC, DT)
    h1, h5 = _magic_pair(w, 1, MAGIC, DT)
    h2, h6 = _magic_pair(w, 2, MAGIC, DT)
    h3, h7 = _magic_pair(w, 3, MAGIC, DT)
    return tl.join(tl.join(tl.join(h0, h4), tl.join(h2, h6)), tl.join(tl.join(h1, h5), tl.join(h3, h7)))


@triton.jit
def _w4_tc_kernel(
    x_ptr, qw_ptr, s_ptr, m_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, K_WORDS, N_GROUPS, stride_xm, stride_qn, stride_sn, stride_ym, ws_plane,
    ZP: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    SWAP: tl.constexpr, UNPACK: tl.constexpr, EVEN_K: tl.constexpr, IS_BF16: tl.constexpr,
):
    """``y[M, N] = x[M, K] @ W[N, K].T (+ bias)`` over N-major int4 words; ``K_WORDS = K/8`` and
    ``N_GROUPS = K/GROUP`` come as arguments so that Triton's divisibility hints reach the masks.
    ``EVEN_K``: ``K`` is a multiple of ``BLOCK_K`` (no K masks at all). Rows past ``M`` / ``N`` read the
    last valid row (no masks on loads) and are dropped at the store."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    NG: tl.constexpr = BLOCK_K // GROUP  # groups per K tile
    W: tl.constexpr = GROUP // 8  # words per group
    KW: tl.constexpr = BLOCK_K // 8  # words per K tile
    DT: tl.constexpr = tl.bfloat16 if IS_BF16 else tl.float16
    MAGIC: tl.constexpr = 0x4300 if IS_BF16 else 0x6400
    BIAS: tl.constexpr = 128.0 if IS_BF16 else 1024.0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
    rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)
    n_tiles = tl.cdiv(K, BLOCK_K)
    t_begin, t_end = _split_tiles(n_tiles, pid_k, SPLIT_K)
    x_rows = x_ptr + rows_m[:, None] * stride_xm  # [BLOCK_M, 1]
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    offs_g = tl.arange(0, NG)
    word = offs_g[:, None] * W + tl.arange(0, W)[None, :]  # [NG, W]
    offs_k = tl.arange(0, BLOCK_K)
    q_rows = qw_ptr + rows_n[:, None, None] * stride_qn  # [BLOCK_N, 1, 1]
    s_rows = s_ptr + rows_n[:, None] * stride_sn  # [BLOCK_N, 1]
    m_rows = m_ptr + rows_n[:, None] * stride_sn
    for tile in range(t_begin, t_end):
        kw = tile * KW + word  # [NG, W]
        gi = tile * NG + offs_g  # [NG]
        ke = tile * BLOCK_K + offs_k  # [BLOCK_K]
        if EVEN_K:
            w = tl.load(q_rows + kw[None, :, :])
            x = tl.load(x_rows + ke[None, :])
            s = tl.load(s_rows + gi[None, :])
            if HAS_MIN:
                mn = tl.load(m_rows + gi[None, :])
        else:
            w = tl.load(q_rows + kw[None, :, :], mask=(kw < K_WORDS)[None, :, :], other=0)
            x = tl.load(x_rows + ke[None, :], mask=(ke < K)[None, :], other=0.0)
            s = tl.load(s_rows + gi[None, :], mask=(gi < N_GROUPS)[None, :], other=0.0)
            if HAS_MIN:
                mn = tl.load(m_rows + gi[None, :], mask=(gi < N_GROUPS)[None, :], other=0.0)
        if UNPACK == 0:  # w = a * (1 + q/16) - b in float32
            a = s.to(tl.float32) * 16.0
            if HAS_MIN:
                b = a + mn.to(tl.float32)
            else:
                b = a * (1.0 + ZP / 16.0)
            wt = a[:, :, None] * _units_natural(w, BLOCK_N, NG, GROUP) - b[:, :, None]
        else:  # w = (v - BIAS) * scale - min in the activation dtype
            v = tl.reshape(_magic_natural(w, MAGIC, DT), [BLOCK_N, NG, GROUP])
            if HAS_MIN:
                wt = (v - BIAS) * s.to(DT)[:, :, None] - mn.to(DT)[:, :, None]
            else:
                wt = (v - (BIAS + ZP)) * s.to(DT)[:, :, None]
        wt = tl.reshape(wt, [BLOCK_N, BLOCK_K]).to(DT)
        if SWAP:
            acc = tl.dot(wt, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(wt), acc)
    if SWAP:
        out = tl.trans(acc)
    else:
        out = acc
    _finish(out, offs_m, offs_n, M, N, b_ptr, y_ptr, stride_ym, ws_ptr, ws_plane, cnt_ptr, pid_n, pid_m, pid_k,
            HAS_BIAS, SPLIT_K)


@triton.jit
def _finish(out, offs_m, offs_n, M, N, b_ptr, y_ptr, stride_ym, ws_ptr, WS_PLANE, cnt_ptr, pid_n, pid_m, pid_k,
            HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Store a ``[BLOCK_M, BLOCK_N]`` float32 tile: directly, or (split K) through the workspace, the last
    split to arrive summing all partials in split order."""
    ym = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        total = out
    else:
        cell = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k * WS_PLANE + cell, out, mask=ym)
        tl.debug_barrier()  # every thread's partial is written before the (one-thread) release below
        tile = cnt_ptr + pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(tile, 1, sem="acq_rel", scope="gpu")
        total = tl.zeros_like(out)
        if arrived == SPLIT_K - 1:
            for s in tl.static_range(SPLIT_K):
                total += tl.load(ws_ptr + s * WS_PLANE + cell, mask=ym, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(tile, 0)  # zeroed again for the next launch
        last = arrived + tl.zeros_like(offs_n) == SPLIT_K - 1  # a vector compare (see _gemv_store)
        ym = ym & last[None, :]
    if HAS_BIAS:
        total += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, total.to(y_ptr.dtype.element_ty), mask=ym)


_SCRATCH: dict = {}
_RETIRED: list = []  # outgrown buffers: a captured CUDA graph may still point at them, so never freed


def _split_scratch(device: torch.device, floats: int, tiles: int):
    """A float32 workspace of at least ``floats`` and ``tiles`` int32 counters (zero), kept per device and
    stream: the counters are left zeroed by every launch, so they are cleared once, at allocation.
    Launches on one stream run in order and may share them; concurrent streams get their own."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    ws, cnt = _SCRATCH.get(key, (None, None))
    if ws is None or ws.numel() < floats:
        _RETIRED.append(ws)
        ws = torch.empty(max(floats, 1 << 20, 2 * (0 if ws is None else ws.numel())), device=device, dtype=torch.float32)
    if cnt is None or cnt.numel() < tiles:
        _RETIRED.append(cnt)
        cnt = torch.zeros(max(tiles, 1 << 14, 2 * (0 if cnt is None else cnt.numel())), device=device, dtype=torch.int32)
    _SCRATCH[key] = (ws, cnt)
    return ws, cnt


def _split_k_launch(x: torch.Tensor, N: int, cfg):
    """For a kernel that reduces split K itself (``_finish``): the output ``[M, N]`` in ``x.dtype``, the grid
    ``(N tiles, M tiles, cfg.split_k)`` and the workspace and counters (with one split: the output, not read)."""
    M = x.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m), cfg.split_k)
    if cfg.split_k > 1:
        ws, cnt = _split_scratch(x.device, cfg.split_k * M * N, grid[0] * grid[1])
    else:
        ws, cnt = y, y
    return y, grid, ws, cnt


def w4_tc_matmul(x: torch.Tensor, w: Int4Weight, bias, cfg) -> torch.Tensor:
    """``x [M, K] @ w.T (+ bias)`` in ``x.dtype`` (float16 or bfloat16); ``cfg``: an ``Int4Config`` of kernel
    ``wtc`` (``block_m`` x ``block_n`` x ``block_k`` tiles, ``split_k``, ``swap``, ``unpack``)."""
    N, K = w.shape
    M = x.shape[0]
    if w.qweight.stride(-1) != 1:
        raise ValueError("int4 kernel 'wtc' reads int32 words along K: it needs N-major packed bytes "
                         "(int4.with_layout(w, k_major=False)); use 'gemv'/'gemm' for K-major ones")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"int4 kernel 'wtc' takes float16 or bfloat16 activations, got {x.dtype}")
    if cfg.block_k % w.group_size:
        raise ValueError(f"block_k {cfg.block_k} must be a multiple of the group size {w.group_size}")
    if cfg.unpack not in UNPACKS:
        raise ValueError(f"unknown unpack {cfg.unpack!r} for 'wtc'; one of {sorted(UNPACKS)}")
    if min(cfg.block_m, cfg.block_n) < 16:
        raise ValueError(f"'wtc' feeds tl.dot: block_m and block_n must be at least 16, got {cfg.block_m}, {cfg.block_n}")
    qw = w.qweight.view(torch.int32)
    y, grid, ws, cnt = _split_k_launch(x, N, cfg)
    mins = w.mins if w.mins is not None else w.scales
    b = bias if bias is not None else w.scales
    _w4_tc_kernel[grid](x, qw, w.scales, mins, b, y, ws, cnt,
                        M, N, K, K // 8, K // w.group_size, x.stride(0), qw.stride(0), w.scales.stride(0), y.stride(0), M * N,
                        ZP=w.zero_point, GROUP=w.group_size, HAS_MIN=w.mins is not None, HAS_BIAS=bias is not None,
                        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
                        SWAP=cfg.swap, UNPACK=UNPACKS[cfg.unpack], EVEN_K=K % cfg.block_k == 0,
                        IS_BF16=x.dtype == torch.bfloat16, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y
