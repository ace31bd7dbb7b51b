"""Int4 GEMV/GEMM kernels and ``KLinearMarlin`` against torch references (GPU, or Triton's interpreter).

Tolerances (relative Frobenius error against a float64 product of the same int4 weights):
float16 activations 2e-3, bfloat16 1e-2 (the dequantized weight tile is rounded to the activation dtype
before the tensor-core product; the GEMV path multiplies in float32).
"""

import pytest
import torch
from torch import nn

from cuda_test_helpers import half_dtypes, rel_err
from cuda_ggml_samples import ggml_tensor

from kt_cuda import int4

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}

SHAPES = [  # M, N, K, group_size, symmetric
    (1, 37, 256, 32, False),
    (1, 100, 384, 128, True),
    (3, 40, 320, 64, False),
    (16, 72, 512, 32, True),
    (33, 24, 256, 128, False),
    (130, 136, 512, 64, False),
    (300, 50, 256, 32, False),
]


def _reference(x, w: int4.Int4Weight, bias=None):
    y = x.double() @ w.dequantize(torch.float64).T
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("M,N,K,group_size,symmetric", SHAPES)
@pytest.mark.parametrize("dtype", half_dtypes())
def test_default_config_matches_reference(device, M, N, K, group_size, symmetric, dtype):
    from kt_cuda.triton_int4 import int4_matmul

    torch.manual_seed(M * 1000 + N)
    w = int4.quantize(torch.randn(N, K), group_size, symmetric=symmetric).to(device)
    x = torch.randn(M, K, device=device).to(dtype)
    bias = torch.randn(N, device=device)
    out = int4_matmul(x, w, bias)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, _reference(x, w, bias)) < TOL[dtype]


CONFIGS = [  # every kernel, with and without split-K, partial row/column/K tiles
    dict(kernel="gemv", block_n=8, block_k=128, split_k=1),
    dict(kernel="gemv", block_n=32, block_k=256, split_k=3),
    dict(kernel="gemm", block_n=32, block_k=128, split_k=1, block_m=16),
    dict(kernel="gemm", block_n=64, block_k=256, split_k=4, block_m=16),
    dict(kernel="gemm", block_n=64, block_k=128, split_k=2, block_m=64),
    dict(kernel="dense"),
    dict(kernel="wgemv", block_n=8, block_k=128, split_k=1, block_m=1),
    dict(kernel="wgemv", block_n=16, block_k=256, split_k=3, block_m=2, prefetch=False),
    dict(kernel="wgemv", block_n=8, block_k=128, split_k=1, block_m=4),
    dict(kernel="wdot", block_n=32, block_k=128, split_k=1, block_m=16, swap=True),
    dict(kernel="wdot", block_n=16, block_k=256, split_k=2, block_m=16, prefetch=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k_major", [False, True], ids=["n_major", "k_major"])
def test_every_kernel_config_is_correct(device, cfg, symmetric, k_major):
    from kt_cuda.triton_int4 import Int4Config, int4_matmul

    torch.manual_seed(7)
    N, K = 61, 640  # K not a multiple of the 256-wide tiles, N not of any block
    w = int4.with_layout(int4.quantize(torch.randn(N, K), 32, symmetric=symmetric), k_major).to(device)
    assert int4.is_k_major(w) == k_major
    x = torch.randn(5, K, device=device).to(torch.float16)
    bias = torch.randn(N, device=device)
    if k_major and cfg["kernel"] in ("wgemv", "wdot"):  # int32 words run along K: N-major bytes only
        with pytest.raises(ValueError, match="N-major"):
            int4_matmul(x, w, bias, Int4Config(**cfg))
        return
    out = int4_matmul(x, w, bias, Int4Config(**cfg))
    assert out.shape == (5, N)
    assert rel_err(out, _reference(x, w, bias)) < TOL[torch.float16]


def test_dense_expansion_is_exact(device):
    from kt_cuda.triton_int4 import int4_to_dense

    qt, ref = ggml_tensor((40, 512), "Q4_K", seed=21)
    w = int4.from_ggml(qt.data.to(device), "Q4_K", qt.shape)
    assert torch.equal(int4_to_dense(w, torch.float32).cpu(), ref)


def _linear(in_f, out_f, bias):
    with torch.device("meta"):
        return nn.Linear(in_f, out_f, bias=bias, dtype=torch.float16)


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_1", "Q4_K"])
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("layout", ["n_major", "k_major"])
def test_klinear_marlin_on_gguf_blocks(device, ggml_type, tokens, layout):
    from kt_cuda.ops import KLinearMarlin

    qt, ref_w = ggml_tensor((48, 512), ggml_type, seed=11)
    bias_qt, bias = ggml_tensor((48,), "F32", seed=12, name="b")
    op = KLinearMarlin(_linear(512, 48, True), device, layout=layout)
    op.load({"weight": qt, "bias": bias_qt})
    assert op.weight_int4 is not None and torch.equal(op.weight_int4.dequantize().cpu(), ref_w)  # lossless repack
    x = torch.randn(2, tokens, 512).to(device, torch.float16)
    out = op(x)
    assert out.shape == (2, tokens, 48) and out.dtype == torch.float16
    ref = x.double().cpu() @ ref_w.double().T + bias.double()
    assert rel_err(out.cpu(), ref) < TOL[torch.float16]


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_K"])
@pytest.mark.parametrize("tokens", [1, 3, 6])
def test_klinear_marlin_int8_activations(device, ggml_type, tokens):
    """``activations: int8``: 1-4 rows are rounded to int8 blocks (error <= 2e-2 of the float product, and
    the exact product of the rounded activations within the float16 tolerance); more rows stay float."""
    from kt_cuda.ops import KLinearMarlin
    from kt_cuda.triton_w4a8 import dequantize_activations, quantize_activations

    qt, ref_w = ggml_tensor((48, 512), ggml_type, seed=14)
    op = KLinearMarlin(_linear(512, 48, False), device, activations="int8")
    op.load({"weight": qt})
    x = torch.randn(tokens, 512).to(device, torch.float16)
    out = op(x).cpu().double()
    plain = x.double().cpu() @ ref_w.double().T
    if tokens <= 4:
        lo, hi, dx, _ = quantize_activations(x)
        exact = dequantize_activations(dx, lo, hi).double().cpu() @ ref_w.double().T
        assert rel_err(out, exact) < TOL[torch.float16]
        assert 0 < rel_err(out, plain) < 2e-2
    else:
        assert rel_err(out, plain) < TOL[torch.float16]
    with pytest.raises(ValueError, match="activations"):
        KLinearMarlin(_linear(512, 48, False), device, activations="fp8")


@pytest.mark.parametrize("ggml_type", ["Q8_0", "F16", "Q6_K"])
def test_klinear_marlin_other_types(device, ggml_type):
    from kt_cuda.ops import KLinearMarlin

    qt, ref_w = ggml_tensor((40, 256), ggml_type, seed=13)
    x = torch.randn(3, 256).to(device, torch.float16)
    ref = x.double().cpu() @ ref_w.double().T
    dense = KLinearMarlin(_linear(256, 40, False), device)
    dense.load({"weight": qt})
    assert dense.weight_int4 is None
    assert rel_err(dense(x).cpu(), ref) < TOL[torch.float16]
    requant = KLinearMarlin(_linear(256, 40, False), device, requantize=True, group_size=64)
    requant.load({"weight": qt})
    assert requant.weight_int4 is not None and requant.weight_int4.group_size == 64
    assert rel_err(requant(x).cpu(), ref) < 0.15  # int4 rounding of the weight dominates


def test_klinear_marlin_rejects_wrong_shape(device):
    from kt_cuda.ops import KLinearMarlin

    qt, _ = ggml_tensor((40, 256), "Q4_0", name="blk.3.attn_q.weight")
    op = KLinearMarlin(_linear(256, 48, False), device)
    with pytest.raises(ValueError, match="blk.3.attn_q.weight"):
        op.load({"weight": qt})


def test_klinear_marlin_dense_fallback_computes_in_a_half_dtype(device):
    """A float32 model (what GGUF files give) keeps non-int4 weights in bfloat16, as the int4 kernels compute;
    a half model keeps its own dtype; an explicit dtype wins."""
    from kt_cuda.ops import KLinearMarlin

    qt, ref_w = ggml_tensor((40, 256), "Q8_0", seed=14)
    x = torch.randn(3, 256, device=device)
    ref = x.double().cpu() @ ref_w.double().T
    with torch.device("meta"):
        fp32_module = nn.Linear(256, 40, bias=False)
    for dtype, want in ((None, torch.bfloat16), ("float32", torch.float32), ("float16", torch.float16)):
        op = KLinearMarlin(fp32_module, device, dtype=dtype)
        op.load({"weight": qt})
        assert op.weight.dtype == want
        y = op(x)
        assert y.dtype == torch.float32  # the input's dtype
        assert rel_err(y.cpu(), ref) < (1e-5 if want == torch.float32 else TOL.get(want, 1e-2))
    half = KLinearMarlin(_linear(256, 40, False), device)
    half.load({"weight": qt})
    assert half.weight.dtype == torch.float16
