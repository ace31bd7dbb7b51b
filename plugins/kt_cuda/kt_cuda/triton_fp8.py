"""Triton kernel of the block-scaled FP8 GEMM (see ``kt_cuda.fp8``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import BLOCK, quantize_activation


@triton.jit
def _fp8_block_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, y_ptr,
    M, N, K, stride_am, stride_asm, stride_bn, stride_bsn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_rows = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn
    as_rows = as_ptr + offs_m.to(tl.int64) * stride_asm
    bs_rows = bs_ptr + (offs_n // SCALE_BLOCK).to(tl.int64) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + offs_k
        k_mask = k < K
        a = tl.load(a_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        a_s = tl.load(as_rows + kb, mask=m_mask, other=0.0)
        b_s = tl.load(bs_rows + kb, mask=n_mask, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def fp8_block_matmul(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [M, K] @ dequant(w_fp8, w_scale).T (+ bias)``, ``x`` quantized per 1x128 group first."""
    M, K = x.shape
    N = w_fp8.shape[0]
    if K % BLOCK:
        raise ValueError(f"fp8_block_matmul: K={K} is not a multiple of {BLOCK}")
    a, a_scale = quantize_activation(x)
    y = torch.empty((M, N), device=x.device, dtype=out_dtype or x.dtype)
    block_m = 16 if M <= 16 else (64 if M <= 64 else 128)
    block_n = 128 if M > 16 else 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _fp8_block_gemm_kernel[grid](
        a, a_scale, w_fp8, w_scale, bias if bias is not None else w_scale, y,
        M, N, K, a.stride(0), a_scale.stride(0), w_fp8.stride(0), w_scale.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK, SCALE_BLOCK=BLOCK,
        num_warps=4 if block_m < 128 else 8, num_stages=3,
    )
    return y
