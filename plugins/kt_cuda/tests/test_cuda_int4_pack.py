"""The int4 layout and the GGUF repack: exact against gguf.quants, on CPU (runs everywhere)."""

import pytest
import torch

from kt_cuda import int4
from kt_cuda.ggml_blocks import GGMLFormatError, split_int4

from cuda_ggml_samples import ggml_tensor


@pytest.mark.parametrize("ggml_type", ["Q4_0", "Q4_1", "Q4_K"])
def test_split_is_bit_exact_with_gguf(ggml_type):
    qt, ref = ggml_tensor((5, 512), ggml_type, seed=1)
    q, scale, mn = split_int4(qt.data, ggml_type, qt.shape)
    assert q.shape == (5, 512) and scale.shape == (5, 16) and mn.shape == (5, 16)
    assert int(q.max()) <= 15
    w = (q.float().view(5, 16, 32) * scale.unsqueeze(-1) - mn.unsqueeze(-1)).view(5, 512)
    assert torch.equal(w, ref)


@pytest.mark.parametrize("ggml_type,scales_dtype,has_mins", [("Q4_0", torch.float16, False), ("Q4_1", torch.float16, True), ("Q4_K", torch.float32, True)])
def test_from_ggml_is_lossless(ggml_type, scales_dtype, has_mins):
    qt, ref = ggml_tensor((3, 2, 256), ggml_type, seed=2)  # 3-D: experts
    w = int4.from_ggml(qt.data, ggml_type, qt.shape)
    assert w.qweight.shape == (3, 2, 128) and w.qweight.dtype == torch.uint8
    assert w.scales.dtype == scales_dtype
    assert (w.mins is not None) == has_mins
    assert torch.equal(w.dequantize(), ref)


def test_from_ggml_float16_scales_is_close_for_q4_k():
    qt, ref = ggml_tensor((4, 256), "Q4_K", seed=3)
    w = int4.from_ggml(qt.data, "Q4_K", qt.shape, scales_dtype=torch.float16)
    assert w.scales.dtype == torch.float16
    err = ((w.dequantize() - ref).norm() / ref.norm()).item()
    assert 0 < err < 2e-3


def test_pack_unpack_roundtrip():
    q = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    p = int4.pack_nibbles(q)
    assert p.shape == (7, 32)
    assert torch.equal(p[:, 0] & 0xF, q[:, 0]) and torch.equal(p[:, 0] >> 4, q[:, 1])
    assert torch.equal(int4.unpack_nibbles(p), q)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_error_is_within_half_a_step(group_size, symmetric):
    torch.manual_seed(0)
    w = torch.randn(6, 256)
    q = int4.quantize(w, group_size, symmetric=symmetric)
    assert q.scales.shape == (6, 256 // group_size)
    step = q.scales.float().repeat_interleave(group_size, -1)
    assert ((q.dequantize() - w).abs() <= step * 0.5 + 1e-3).all()


def test_concat_harmonizes_formats():
    a_qt, a_ref = ggml_tensor((2, 3, 256), "Q4_0", seed=4)
    b_qt, b_ref = ggml_tensor((2, 5, 256), "Q4_K", seed=5)
    joined = int4.concat([int4.from_ggml(a_qt.data, "Q4_0", a_qt.shape), int4.from_ggml(b_qt.data, "Q4_K", b_qt.shape)])
    assert joined.shape == (2, 8, 256)
    assert torch.equal(joined.dequantize(), torch.cat([a_ref, b_ref], dim=1))


def test_bad_sizes_name_the_tensor():
    qt, _ = ggml_tensor((2, 256), "Q4_0")
    with pytest.raises(GGMLFormatError, match="blk.0.w"):
        split_int4(qt.data[:-1], "Q4_0", qt.shape, name="blk.0.w")
    with pytest.raises(GGMLFormatError, match="not a 4-bit format"):
        split_int4(qt.data, "Q8_0", qt.shape)
    with pytest.raises(ValueError, match="group_size"):
        int4.quantize(torch.randn(2, 96), 48)
