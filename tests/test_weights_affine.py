"""GGUF blocks -> per-group affine integers, against gguf.quants' dequantization (CPU only)."""

import pytest
import torch

from ktcore.weights.affine import AFFINE_TYPES, GGMLAffineError, affine_groups
from ktcore.testing import gguf_reference as reference, quantized_sample as quantized


@pytest.mark.parametrize("ggml_type", sorted(AFFINE_TYPES))
def test_affine_groups_equal_gguf_dequantization(ggml_type):
    qt = quantized(ggml_type, (6, 512), seed=1)
    groups = affine_groups(qt.data, qt.ggml_type, qt.shape, qt.name)
    ref = reference(qt)
    assert groups.codes.dtype == torch.int8 and groups.codes.shape == (6, 512)
    assert groups.scale.shape == (6, 16)
    low, high = (-8, 7) if groups.bits == 4 else (-128, 127)
    assert int(groups.codes.min()) >= low and int(groups.codes.max()) <= high
    # scale*code and bias are float32 products of the same halves; only the bias addition may round
    torch.testing.assert_close(groups.dequantize(), ref, rtol=0, atol=2e-6 * float(ref.abs().max()))


def test_affine_groups_keep_leading_dimensions():
    qt = quantized("Q4_K", (3, 4, 256), seed=2)
    groups = affine_groups(qt.data, qt.ggml_type, qt.shape)
    assert groups.codes.shape == (3, 4, 256) and groups.scale.shape == (3, 4, 8) and groups.bias.shape == (3, 4, 8)
    torch.testing.assert_close(groups.dequantize(), reference(qt), rtol=0, atol=1e-5)


def test_symmetric_formats_have_no_bias():
    for ggml_type in ("Q4_0", "Q5_0", "Q8_0"):
        qt = quantized(ggml_type, (2, 64))
        assert affine_groups(qt.data, qt.ggml_type, qt.shape).bias is None


def test_unsupported_type_and_bad_sizes_name_the_tensor():
    qt = quantized("Q6_K", (2, 256))
    with pytest.raises(GGMLAffineError, match="blk.0.w.*Q6_K has no per-32 affine"):
        affine_groups(qt.data, "Q6_K", qt.shape, "blk.0.w")
    qt = quantized("Q4_0", (2, 64))
    with pytest.raises(GGMLAffineError, match="blk.1.w: Q4_0 \\(2, 96\\) needs 108 bytes"):
        affine_groups(qt.data, "Q4_0", (2, 96), "blk.1.w")
