"""KLinearAscend / KExpertsAscend loading and forward on the CPU, with ``ReferenceKernels`` (the documented
``npu_weight_quant_batchmatmul`` formula in torch) in place of the torch_npu calls, against the
dequantized GGUF weights. What the NPU itself computes is tested in test_on_npu.py."""

import pytest
import torch
from torch import nn

from kt_ascend.experts import KExpertsAscend
from kt_ascend.linear import KLinearAscend
from kt_ascend.quant_matrix import AntiquantWeight, ReferenceKernels
from ktcore.testing import experts_loop_reference, gguf_reference as reference, quantized_moe_weights, quantized_sample as quantized
from ktcore.weights.affine import affine_groups
from ktcore.weights.tensor import QuantizedTensor

torch.set_num_threads(2)


def f32_tensor(name, tensor):
    return QuantizedTensor(name, "F32", tuple(tensor.shape), tensor.contiguous().reshape(-1).view(torch.uint8), "test")


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q8_0"])
def test_antiquant_scale_and_offset_reproduce_the_gguf_weight(ggml_type):
    qt = quantized(ggml_type, (16, 512), seed=3)
    aq = AntiquantWeight.from_groups(affine_groups(qt.data, qt.ggml_type, qt.shape))
    assert aq.codes.shape == (512, 16) and aq.scale.shape == (16, 16)
    assert aq.codes.dtype == (torch.int32 if ggml_type.startswith("Q4") else torch.int8)
    if aq.bits == 4:
        assert int(aq.codes.min()) >= -8 and int(aq.codes.max()) <= 7  # npu_convert_weight_to_int4pack's range
    ref = reference(qt)
    torch.testing.assert_close(aq.dequantize(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_a_group_with_zero_scale_keeps_its_constant_value():
    qt = quantized("Q4_1", (8, 64), seed=4)
    groups = affine_groups(qt.data, qt.ggml_type, qt.shape)
    scale = groups.scale.clone()
    scale[2, 1] = 0.0  # a Q4_1 block whose 32 weights all equal its min
    groups = type(groups)(groups.codes, scale, groups.bias, groups.bits)
    expected = groups.dequantize()
    aq = AntiquantWeight.from_groups(groups)
    assert torch.isfinite(aq.offset).all()
    torch.testing.assert_close(aq.dequantize(), expected, rtol=0, atol=1e-6)


def linear_op(in_features, out_features, bias, **kwargs):
    with torch.device("meta"):
        module = nn.Linear(in_features, out_features, bias=bias)
    op = KLinearAscend(module, "cpu", **kwargs)
    op.kernels = ReferenceKernels
    return op


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q4_0", "Q8_0", "Q6_K"])
@pytest.mark.parametrize("compute_dtype", ["float16", "bfloat16"])
def test_linear_matches_the_dequantized_weight(ggml_type, compute_dtype):
    qt = quantized(ggml_type, (64, 256), seed=5, name="blk.0.ffn_up.weight")
    bias = torch.randn(64) * 0.1
    op = linear_op(256, 64, True, compute_dtype=compute_dtype)
    op.load({"weight": qt, "bias": f32_tensor("blk.0.ffn_up.bias", bias)})
    assert op.matrix.quantized == (ggml_type != "Q6_K")  # Q6_K (groups of 16) is dequantized
    x = torch.randn(2, 3, 256)
    y = op(x)
    assert y.shape == (2, 3, 64) and y.dtype == x.dtype
    dtype = op.compute_dtype
    expected = x.to(dtype).float() @ reference(qt).t() + bias.to(dtype).float()
    tol = (4e-3 if dtype == torch.float16 else 3e-2) * float(expected.abs().max())
    torch.testing.assert_close(y, expected, rtol=0, atol=tol)


def test_linear_rejects_a_weight_of_another_shape_and_a_bad_dtype():
    op = linear_op(256, 64, False)
    with pytest.raises(ValueError, match="blk.0.w has shape \\(32, 256\\), expected \\(64, 256\\)"):
        op.load({"weight": quantized("Q4_0", (32, 256), name="blk.0.w")})
    with pytest.raises(ValueError, match="compute_dtype must be one of float16, bfloat16, got 'int8'"):
        linear_op(256, 64, False, compute_dtype="int8")


def test_int4_needs_output_columns_in_eights():
    op = linear_op(256, 12, False)
    op.load({"weight": quantized("Q4_0", (12, 256))})
    assert not op.matrix.quantized  # dense fallback instead of a pack the kernel would reject


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q8_0"])
def test_experts_match_a_loop_over_dequantized_experts(ggml_type):
    experts, hidden, inter = 4, 256, 256
    module = nn.Module()
    module.act_fn = nn.SiLU()
    op = KExpertsAscend(module, "cpu")
    op.kernels = ReferenceKernels
    weights = quantized_moe_weights(experts, hidden, inter, ggml_type)
    op.load(weights)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, hidden, generator=g) * 0.1
    index = torch.tensor([[0, 2], [2, 3], [1, 0], [3, 3], [4, 1]])  # 4 is padding (outside the table)
    topk_w = torch.rand(5, 2, generator=g)
    y = op(x, index, topk_w)
    expected = experts_loop_reference(weights, module.act_fn, x.half().float(), index, topk_w)
    torch.testing.assert_close(y, expected, rtol=0, atol=5e-3 * float(expected.abs().max()))


def test_experts_load_names_what_is_missing():
    module = nn.Module()
    module.act_fn = nn.SiLU()
    op = KExpertsAscend(module, "cpu")
    with pytest.raises(KeyError, match="missing down_proj"):
        op.load({k: v for k, v in quantized_moe_weights(2, 64, 64, "Q8_0").items() if k != "down_proj"})
