"""The int32-word int4 kernels (``wgemv``, ``wdot``, ``a8gemv``) run in Triton's interpreter on CPU, in a subprocess
(``TRITON_INTERPRET`` is read when the kernels are defined), so that CPU CI checks their logic: with and
without prefetch, 1-4 rows per program, split K, swapped operands, partial tiles, symmetric and asymmetric
groups of 32/64/128, against a float64 product of the same int4 weights. Skips where Triton is absent."""

import importlib.util

import pytest
from cuda_test_helpers import run_interpreted

SCRIPT = r"""
import torch
from kt_cuda import int4
from kt_cuda.triton_int4 import Int4Config as C, int4_matmul

torch.manual_seed(0)
N, K = 21, 384  # N not a multiple of any block, K not of the 256-wide tiles
cases = [
    (32, False, 3, C("wgemv", 8, 128, 1, block_m=1)),
    (32, True, 3, C("wgemv", 8, 256, 2, block_m=4, prefetch=False)),
    (64, False, 1, C("wgemv", 16, 128, 1, block_m=2)),
    (128, True, 5, C("wgemv", 4, 256, 1, block_m=4)),
    (32, False, 17, C("wdot", 16, 128, 1, block_m=16, swap=True)),
    (64, True, 3, C("wdot", 32, 256, 2, block_m=16, prefetch=False)),
]
for group, symmetric, M, cfg in cases:
    w = int4.quantize(torch.randn(N, K), group, symmetric=symmetric)
    x = torch.randn(M, K).half()
    bias = torch.randn(N)
    ref = x.double() @ w.dequantize(torch.float64).T + bias.double()
    out = int4_matmul(x, w, bias, cfg)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(cfg.label(), group, symmetric, M, f"{err:.1e}")
    assert out.shape == (M, N) and out.dtype == torch.float16
    assert err < 2e-3, (cfg.label(), group, symmetric, M, err)
print("ok")
"""

A8_SCRIPT = r"""
import torch
from kt_cuda import int4
from kt_cuda.triton_int4 import Int4Config as C, int4_matmul
from kt_cuda.triton_w4a8 import dequantize_activations, quantize_activations

torch.manual_seed(0)
N, K = 21, 384
cases = [
    (32, False, 1, C("a8gemv", 8, 128, 1, block_m=1)),
    (64, True, 3, C("a8gemv", 16, 128, 2, block_m=4)),
    (128, False, 2, C("a8gemv", 4, 128, 1, block_m=2, prefetch=False)),
]
for group, symmetric, M, cfg in cases:
    w = int4.quantize(torch.randn(N, K), group, symmetric=symmetric)
    x = torch.randn(M, K).half()
    bias = torch.randn(N)
    lo, hi, dx, xs = quantize_activations(x)
    x_hat = dequantize_activations(dx, lo, hi).double()
    assert ((x_hat - x.double()).abs() <= dx.double().repeat_interleave(32, 1) / 2 + 1e-6).all()
    assert torch.allclose(xs.double(), x_hat.reshape(M, -1, 32).sum(-1), atol=1e-4)
    wd = w.dequantize(torch.float64)
    exact = x_hat @ wd.T + bias.double()  # the product the kernel computes: int4 weights x int8 activations
    plain = x.double() @ wd.T + bias.double()
    out = int4_matmul(x, w, bias, cfg).double()
    err = ((out - exact).norm() / exact.norm()).item()
    err_x = ((out - plain).norm() / plain.norm()).item()
    print(cfg.label(), group, symmetric, M, f"{err:.1e} {err_x:.1e}")
    assert err < 2e-3 and err_x < 2e-2, (cfg.label(), err, err_x)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (its interpreter runs the kernels on CPU)")
def test_word_kernels_in_triton_interpreter():
    run_interpreted(SCRIPT)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (its interpreter runs the kernels on CPU)")
def test_int8_activation_kernel_in_triton_interpreter():
    """``a8gemv``: activations rounded to int8 per block of 32 (each within half a step), then the exact
    product with the int4 weights (dp4a emulated), within 2e-2 of the float product."""
    run_interpreted(A8_SCRIPT)
