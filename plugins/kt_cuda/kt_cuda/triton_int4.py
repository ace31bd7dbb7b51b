"""Triton kernels over the int4 layout of ``kt_cuda.int4`` (imported only where Triton exists).

- ``_int4_gemv_kernel``: a few activation rows per program; CUDA-core dot products over a
  ``[BLOCK_N, groups, words, 8]`` tile, per-group scale applied once per group (``s*sum(q*x) - m*sum(x)``).
  Memory-bound: it streams the packed weight once for all its rows. Used for M <= 4.
  (``_int4_gemv_bytes_kernel``: the first version, byte loads, kept for comparison in the benchmark.)
- ``_int4_gemm_kernel``: dequantizes a weight tile into registers and feeds ``tl.dot`` (tensor cores);
  used for 4 < M < 256. Kernels split K over a third grid axis when N alone gives too few programs
  (fp32 atomics). From 256 rows the weight is expanded (``_int4_to_dense_kernel``) for torch's GEMM.
- ``_moe_int4_kernel``: the GEMM over token-expert pairs sorted by expert (``KExpertsGPU``).

Nibbles become floats through the exponent trick (``0x4B000000 | q`` is ``2**23 + q`` as float32),
which costs an OR and a subtraction instead of an integer-to-float conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .int4 import Int4Weight


@triton.jit
def _nibble_f32(q):
    return (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _int4_gemv_bytes_kernel(
    x_ptr, qw_ptr, s_ptr, m_ptr, b_ptr, y_ptr,
    N, K, stride_xm, stride_qn, stride_sn, stride_ym,
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
        q = tl.load(q_rows + byte[None, :, :], mask=n_mask[:, None, None] & g_mask[None, :, None], other=0)
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
def _int4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, m_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
    ZP: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """``ROWS`` activation rows against a ``[BLOCK_N, BLOCK_K]`` weight tile read as int32 words.

    Word ``w`` of a row holds weights ``8w .. 8w+7`` (nibble ``i`` = weight ``8w+i``), so the matching
    activations are one contiguous load. A nibble becomes ``1 + q/16`` by OR-ing it into the mantissa of
    1.0 (no conversion, no subtraction); per group ``sum(q*x) = 16*(sum((1+q/16)*x) - sum(x))``.
    ``stride_qn`` counts words.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    NG: tl.constexpr = BLOCK_K // GROUP
    W: tl.constexpr = GROUP // 8
    n_groups = K // GROUP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = pid_m * ROWS + tl.arange(0, ROWS)
    r_mask = offs_r < M
    word_in_tile = tl.arange(0, NG)[:, None] * W + tl.arange(0, W)[None, :]
    nibble = tl.arange(0, 8)
    elem_in_tile = word_in_tile[:, :, None] * 8 + nibble[None, None, :]
    per_split = tl.cdiv(tl.cdiv(n_groups, NG), SPLIT_K) * NG
    g_begin = pid_k * per_split
    g_end = tl.minimum(g_begin + per_split, n_groups)
    q_rows = qw_ptr.to(tl.pointer_type(tl.int32)) + offs_n.to(tl.int64)[:, None, None] * stride_qn
    x_rows = x_ptr + offs_r.to(tl.int64)[:, None, None, None] * stride_xm
    s_rows = offs_n.to(tl.int64)[:, None] * stride_sn
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for g0 in range(g_begin, g_end, NG):
        g_idx = g0 + tl.arange(0, NG)
        g_mask = g_idx < g_end
        words = tl.load(q_rows + (g0 * W + word_in_tile)[None, :, :], mask=n_mask[:, None, None] & g_mask[None, :, None], other=0)
        q = (words[:, :, :, None] >> (nibble * 4)[None, None, None, :]) & 0xF
        q1 = ((q << 19) | 0x3F800000).to(tl.float32, bitcast=True)
        x = tl.load(x_rows + (g0 * GROUP + elem_in_tile)[None, :, :, :],
                    mask=r_mask[:, None, None, None] & g_mask[None, :, None, None], other=0.0).to(tl.float32)
        part = tl.sum(tl.sum(q1[None, :, :, :, :] * x[:, None, :, :, :], axis=4), axis=3)
        x_sum = tl.sum(tl.sum(x, axis=3), axis=2)
        sm = n_mask[:, None] & g_mask[None, :]
        s16 = tl.load(s_ptr + s_rows + g_idx[None, :], mask=sm, other=0.0).to(tl.float32) * 16.0
        if HAS_MIN:
            mn = tl.load(m_ptr + s_rows + g_idx[None, :], mask=sm, other=0.0).to(tl.float32)
        else:
            mn = s16 * (ZP / 16.0)
        acc += tl.sum(s16[None, :, :] * part - (s16 + mn)[None, :, :] * x_sum[:, None, :], axis=2)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    y = y_ptr + offs_r.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    ym = r_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=ym)
    else:
        tl.atomic_add(y, acc, mask=ym)


@triton.jit
def _int4_to_dense_kernel(qw_ptr, s_ptr, m_ptr, y_ptr, N, K, stride_qn, stride_sn, stride_yn,
                          ZP: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Expand an int4 weight to a dense ``[N, K]`` tensor (for large batches, then a library GEMM)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    byte = tl.load(qw_ptr + rows * stride_qn + offs_k[None, :] // 2, mask=mask, other=0)
    q = ((byte >> ((offs_k[None, :] % 2) * 4)) & 0xF).to(tl.float32)
    s = tl.load(s_ptr + rows * stride_sn + offs_k[None, :] // GROUP, mask=mask, other=0.0).to(tl.float32)
    if HAS_MIN:
        mn = tl.load(m_ptr + rows * stride_sn + offs_k[None, :] // GROUP, mask=mask, other=0.0).to(tl.float32)
    else:
        mn = s * ZP
    tl.store(y_ptr + rows * stride_yn + offs_k[None, :], (s * q - mn).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_tile(q_rows, s_ptr, m_ptr, s_rows, g0, g_idx, g_mask, n_mask, tile_bytes,
                  ZP: tl.constexpr, GH: tl.constexpr, HAS_MIN: tl.constexpr,
                  BLOCK_N: tl.constexpr, HALF: tl.constexpr):
    """Weights of one K tile (float32) as two ``[BLOCK_N, BLOCK_K/2]`` halves: even and odd K positions."""
    byte = g0 * GH + tile_bytes
    q = tl.load(q_rows + byte[None, :, :], mask=n_mask[:, None, None] & g_mask[None, :, None], other=0)
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
    M, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
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
        w_even, w_odd = _dequant_tile(q_rows, s_ptr, m_ptr, s_rows, g0, g_idx, g_mask, n_mask, tile_bytes,
                                      ZP, GH, HAS_MIN, BLOCK_N, HALF)
        k_even = g0 * GROUP + 2 * offs_h
        xm = m_mask[:, None] & (k_even < g_end * GROUP)[None, :]
        x_even = tl.load(x_rows + k_even[None, :], mask=xm, other=0.0)
        x_odd = tl.load(x_rows + k_even[None, :] + 1, mask=xm, other=0.0)
        acc = tl.dot(x_even, tl.trans(w_even.to(x_even.dtype)), acc)
        acc = tl.dot(x_odd, tl.trans(w_odd.to(x_odd.dtype)), acc)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    ym = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=ym)
    else:
        tl.atomic_add(y, acc, mask=ym)


@triton.jit
def _moe_int4_kernel(
    x_ptr, qw_ptr, s_ptr, m_ptr, y_ptr, pair_ptr, block_expert_ptr,
    num_pairs, N, K, x_row_div, stride_xm, stride_qe, stride_qn, stride_se, stride_sn, stride_ym,
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
            w_even, w_odd = _dequant_tile(q_rows, s_ptr, m_ptr, s_rows, g0, g_idx, g_mask, n_mask, tile_bytes,
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
    """One launch. ``kernel``: ``gemv`` (CUDA cores, ``rows`` activation rows per program, int32 word
    loads), ``gemv_bytes`` (CUDA cores, one row, byte loads), ``gemm`` (tensor cores, ``block_m`` rows)
    or ``dense`` (expand the weight, then torch's GEMM: large batches)."""

    kernel: str
    block_n: int = 32
    block_k: int = 512
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    rows: int = 1
    block_m: int = 16

    def label(self) -> str:
        if self.kernel == "dense":
            return "dense"
        m = f"r{self.rows}" if self.kernel == "gemv" else (f"m{self.block_m}" if self.kernel == "gemm" else "")
        return f"{self.kernel}:{m}n{self.block_n}k{self.block_k}s{self.split_k}w{self.num_warps}st{self.num_stages}"


@lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_for(programs: int, k_tiles: int, sms: int, waves: int = 4, max_split: int = 4) -> int:
    """Split K until the grid covers the GPU ``waves`` times, keeping at least 2 K tiles per split."""
    split = 1
    while programs * split < waves * sms and k_tiles // (split * 2) >= 2 and split < max_split:
        split *= 2
    return split


# batches at or above this expand the weight and use torch's GEMM
DENSE_MIN_ROWS = 256
# batches up to this use the CUDA-core kernel (one weight pass for all rows), above it tensor cores
GEMV_MAX_ROWS = 4


def default_config(M: int, N: int, K: int, group_size: int, device: torch.device) -> Int4Config:
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:  # Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors: shape the grid as for an H100
        sms = 132
    if M >= DENSE_MIN_ROWS:
        return Int4Config("dense")
    if M <= GEMV_MAX_ROWS:
        rows = 1 if M == 1 else (2 if M == 2 else 4)
        block_n, block_k = (32, 512) if rows == 1 else (16, 256)
        block_k = max(block_k, group_size)
        split = _split_for(triton.cdiv(N, block_n), triton.cdiv(K, block_k), sms)
        return Int4Config("gemv", block_n, block_k, split, num_warps=4, num_stages=3, rows=rows)
    block_m = 16 if M <= 16 else 64
    block_n = 128 if N >= 8192 and block_m == 16 else 64
    block_k = max(128, group_size)
    programs = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    split = _split_for(programs, triton.cdiv(K, block_k), sms, waves=3)
    return Int4Config("gemm", block_n, block_k, split, num_warps=4, num_stages=3, block_m=block_m)


def int4_to_dense(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The 2-D int4 weight expanded to ``dtype`` (one Triton pass)."""
    N, K = w.shape
    y = torch.empty((N, K), device=w.qweight.device, dtype=dtype)
    mins = w.mins if w.mins is not None else w.scales
    grid = (triton.cdiv(N, 32), triton.cdiv(K, 256))
    _int4_to_dense_kernel[grid](w.qweight, w.scales, mins, y, N, K, w.qweight.stride(0), w.scales.stride(0), y.stride(0),
                                ZP=w.zero_point, GROUP=w.group_size, HAS_MIN=w.mins is not None,
                                BLOCK_N=32, BLOCK_K=256, num_warps=4)
    return y


def int4_matmul(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None, config: Int4Config | None = None) -> torch.Tensor:
    """``x [M, K] @ w.T + bias`` for a 2-D ``Int4Weight`` ``[N, K]``; result in ``x.dtype``."""
    if x.dim() != 2:
        raise ValueError(f"int4_matmul wants a 2-D activation, got shape {tuple(x.shape)}")
    N, K = w.shape
    M = x.shape[0]
    if x.shape[1] != K:
        raise ValueError(f"activation has {x.shape[1]} features, weight expects {K}")
    x = x.contiguous()
    cfg = config or default_config(M, N, K, w.group_size, x.device)
    if cfg.kernel == "dense":
        y = torch.nn.functional.linear(x, int4_to_dense(w, x.dtype))
        return y + bias.to(y.dtype) if bias is not None else y
    if cfg.block_k % w.group_size:
        raise ValueError(f"block_k {cfg.block_k} must be a multiple of the group size {w.group_size}")
    split = cfg.split_k
    y = (torch.zeros if split > 1 else torch.empty)((M, N), device=x.device, dtype=torch.float32 if split > 1 else x.dtype)
    mins = w.mins if w.mins is not None else w.scales
    b = bias if bias is not None else w.scales
    common = dict(ZP=w.zero_point, GROUP=w.group_size, HAS_MIN=w.mins is not None, HAS_BIAS=bias is not None,
                  BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.kernel == "gemv":
        grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.rows), split)
        _int4_gemv_kernel[grid](x, w.qweight, w.scales, mins, b, y, M, N, K,
                                x.stride(0), w.qweight.stride(0) // 4, w.scales.stride(0), y.stride(0),
                                ROWS=cfg.rows, **common)
    elif cfg.kernel == "gemv_bytes":
        grid = (triton.cdiv(N, cfg.block_n), M, split)
        _int4_gemv_bytes_kernel[grid](x, w.qweight, w.scales, mins, b, y, N, K,
                                      x.stride(0), w.qweight.stride(0), w.scales.stride(0), y.stride(0), **common)
    elif cfg.kernel == "gemm":
        grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m), split)
        _int4_gemm_kernel[grid](x, w.qweight, w.scales, mins, b, y, M, N, K,
                                x.stride(0), w.qweight.stride(0), w.scales.stride(0), y.stride(0),
                                BLOCK_M=cfg.block_m, **common)
    else:
        raise ValueError(f"unknown int4 kernel {cfg.kernel!r}; kernels: gemv, gemv_bytes, gemm, dense")
    return y if split == 1 else y.to(x.dtype)


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
                               w.qweight.stride(0), w.qweight.stride(1), w.scales.stride(0), w.scales.stride(1), y.stride(0),
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
