"""KLinearXPU / KExpertsXPU on the CPU, with ``ReferenceKernels`` (the XPU int4 GEMM's contract in torch)
in place of torch's XPU ops, against gguf.quants' dequantization. The XPU itself: test_on_xpu.py."""

import pytest
import torch
from torch import nn

from kt_xpu._env import int4_kernels_missing
from kt_xpu.experts import KExpertsXPU
from kt_xpu.linear import KLinearXPU
from kt_xpu.quant_matrix import Int4Weight, ReferenceKernels, pack_nibbles, unpack_nibbles
from ktcore.testing import experts_loop_reference, gguf_reference as reference, quantized_moe_weights, quantized_sample as quantized
from ktcore.weights.affine import affine_groups
from ktcore.weights.tensor import QuantizedTensor

torch.set_num_threads(2)


def test_nibble_packing_order():
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 7, 8]], dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.tolist() == [[0x21, 0x43], [0x0F, 0x87]]  # even k low nibble, odd k high nibble
    assert torch.equal(unpack_nibbles(packed), q)


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_repack_reproduces_the_gguf_weight(ggml_type):
    qt = quantized(ggml_type, (16, 512), seed=3)
    w = Int4Weight.from_groups(affine_groups(qt.data, qt.ggml_type, qt.shape))
    assert w.nibbles.shape == (16, 256) and w.scale.shape == (16, 16) and w.zeros.dtype == torch.int8
    assert (w.bias is None) == (ggml_type == "Q4_0")
    ref = reference(qt)
    torch.testing.assert_close(w.dequantize(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_int4_repack_refuses_8_bit_codes():
    qt = quantized("Q8_0", (4, 64))
    with pytest.raises(ValueError, match="expected 4-bit codes"):
        Int4Weight.from_groups(affine_groups(qt.data, qt.ggml_type, qt.shape))


def linear_op(in_features, out_features, bias, **kwargs):
    with torch.device("meta"):
        module = nn.Linear(in_features, out_features, bias=bias)
    op = KLinearXPU(module, "cpu", **kwargs)
    op.kernels = ReferenceKernels
    return op


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_1", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("compute_dtype", ["float16", "bfloat16"])
def test_linear_matches_the_dequantized_weight(ggml_type, compute_dtype):
    qt = quantized(ggml_type, (64, 256), seed=5)
    bias = torch.randn(64) * 0.1
    op = linear_op(256, 64, True, compute_dtype=compute_dtype)
    data = bias.contiguous().view(torch.uint8)
    op.load({"weight": qt, "bias": QuantizedTensor("b", "F32", (64,), data, "test")})
    assert op.matrix.quantized == (ggml_type != "Q6_K")
    x = torch.randn(2, 3, 256)
    y = op(x)
    assert y.shape == (2, 3, 64) and y.dtype == x.dtype
    dtype = op.compute_dtype
    expected = x.to(dtype).float() @ reference(qt).t() + bias.to(dtype).float()
    tol = (4e-3 if dtype == torch.float16 else 3e-2) * float(expected.abs().max())
    torch.testing.assert_close(y, expected, rtol=0, atol=tol)


@pytest.mark.skipif(int4_kernels_missing() is None, reason="this torch has the XPU int4 kernels")
def test_without_the_xpu_int4_kernels_the_weight_stays_dense():
    with torch.device("meta"):
        module = nn.Linear(256, 64, bias=False)
    op = KLinearXPU(module, "cpu")  # this torch has no XPU int4 kernels: dense fallback
    op.load({"weight": quantized("Q4_0", (64, 256))})
    assert not op.matrix.quantized and op.matrix.weight.dtype == torch.float16


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q4_1"])
def test_experts_match_a_loop_over_dequantized_experts(ggml_type):
    experts, hidden, inter = 4, 256, 256
    module = nn.Module()
    module.act_fn = nn.SiLU()
    op = KExpertsXPU(module, "cpu")
    op.kernels = ReferenceKernels
    weights = quantized_moe_weights(experts, hidden, inter, ggml_type)
    op.load(weights)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, hidden, generator=g) * 0.1
    index = torch.tensor([[0, 2], [2, 3], [1, 0], [3, 3], [4, 1]])  # 4 is padding
    topk_w = torch.rand(5, 2, generator=g)
    y = op(x, index, topk_w)
    expected = experts_loop_reference(weights, module.act_fn, x.half().float(), index, topk_w)
    torch.testing.assert_close(y, expected, rtol=0, atol=5e-3 * float(expected.abs().max()))
