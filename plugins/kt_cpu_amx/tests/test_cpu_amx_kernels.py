"""Repacking and the linear kernels against references: gguf-py's dequantizer and F.linear / KLinearTorch
on the same dequantized weights, for every type, token counts 1, 3, 64, 512 and every ISA path here.

Tolerance: relative Frobenius error <= 2e-2 of the output (activations are quantized to int8 per block of
32, or rounded to bf16 on the AMX path); the repacked weights themselves are exact (<= 1 ulp)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cpu_amx_helpers import EXACT_TYPES, REQUANTIZED_TYPES, float_tensor, gguf_dequantize, random_blocks, rel_err
from torch import nn

from kt_cpu_amx import repack
from kt_cpu_amx.ops import KLinearCPU
from kt_cpu_amx.runtime import get_runtime
from ktcore.builtin.linear import KLinearTorch
from ktcore.weights.tensor import QuantizedTensor

TOL = 2e-2
TOKENS = (1, 3, 64, 512)
ZERO_POINTS = {"Q4_0": 8, "Q5_0": 16, "Q6_K": 32, "Q8_0": 128}
# packed bytes per 256 weights: quants + scales (+ mins) (+ floats per super-block)
PACKED_BYTES_PER_256 = {
    "Q4_0": 128 + 8 * 2, "Q4_1": 128 + 8 * 2 * 2, "Q4_K": 128 + 8 + 8 + 2 * 4,
    "Q5_0": 256 + 8 * 2, "Q5_1": 256 + 8 * 2 * 2, "Q5_K": 256 + 16 + 16 + 2 * 4,
    "Q6_K": 256 + 16 + 4, "Q8_0": 256 + 8 * 2,
}


@pytest.mark.parametrize("type_name", EXACT_TYPES)
def test_repack_is_exact(type_name):
    qt = random_blocks(type_name, (40, 512), seed=1, centered=False)
    (pm,) = repack.pack_matrices(qt)
    assert pm.bits == (4 if type_name in repack.EXACT_4BIT else 8)
    # 8-bit groups are 16 wide, or 32 where GGUF has one scale (and min) per 32: Q8_0 streams GGUF's 1.0625 B/weight
    assert pm.group == (16 if type_name in ("Q5_K", "Q6_K") else 32)
    # one fp16 scale per block: the group scales and mins are fp16 too; K-quants' products are not
    assert pm.half_scales == (type_name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"))
    # K-quants keep their integer sub-scales under one float per super-block: Q4_K (8 groups of 32) 4.75 bits
    # per weight, not 6; Q5_K and Q6_K (16 groups of 16) 1.156 and 1.078 bytes per weight, not 1.5
    assert pm.sub8_scales == (type_name == "Q4_K")
    assert pm.sub16_scales == (type_name in ("Q5_K", "Q6_K"))
    # a zero point replaces the mins where every min is -zp * scale (zp a power of two: the same float products)
    assert pm.zero_point == ZERO_POINTS.get(type_name, 0)
    assert pm.nbytes == 40 * 512 * PACKED_BYTES_PER_256[type_name] // 256
    ref = gguf_dequantize(qt)
    torch.testing.assert_close(repack.unpack(pm), ref, rtol=1e-6, atol=0)


def _packing(pm) -> tuple:
    return (pm.n, pm.k, pm.bits, pm.group, pm.zero_point, pm.half_scales, pm.sub8_scales, pm.sub16_scales,
            pm.iq_type, pm.buffers())


@pytest.mark.parametrize("type_name", EXACT_TYPES + ("IQ4_XS", "F32-int8", "F32-int4"))
def test_repack_threads_give_the_same_bytes(type_name):
    """Rows are shared among a runtime's threads at load: any thread count packs the bytes one thread packs (a
    matrix big enough to be split, 437 rows so that the last slice is shorter)."""
    shape = (437, 1024)
    if type_name.startswith("F32"):
        qt, bits = float_tensor(torch.randn(shape, generator=torch.Generator().manual_seed(3))), int(type_name[-1])
    else:
        qt, bits = random_blocks(type_name, shape, seed=3), 8
    (one,) = repack.pack_matrices(qt, bits)
    for threads in (1, 2, 3, 8):
        (many,) = repack.pack_matrices(qt, bits, runtime=get_runtime(threads))
        assert _packing(many) == _packing(one), threads
    assert sum(map(len, one.buffers().values())) == one.nbytes


def test_q8_0_is_packed_as_its_blocks_say():
    """Q8_0's layout, byte for byte, on one thread and on a runtime's: q = int8 + 128, each block's fp16 d as its
    group's scale, zero point 128, no mins; scales that are all zero keep the mins, an inf one keeps float scales."""
    qt = random_blocks("Q8_0", (437, 1024), seed=4)
    blocks = qt.data.numpy().reshape(-1, 34)
    for runtime in (None, get_runtime(2)):
        (pm,) = repack.pack_matrices(qt, runtime=runtime)
        buffers = pm.buffers()
        assert (pm.group, pm.zero_point, pm.half_scales, buffers["mins"]) == (32, 128, True, b"")
        assert buffers["qs"] == (blocks[:, 2:] ^ 0x80).tobytes()
        assert buffers["scales"] == blocks[:, :2].tobytes()
    zero = blocks.copy()
    zero[:, :2] = 0
    (pm,) = repack.pack_matrices(QuantizedTensor("zero", "Q8_0", qt.shape, torch.from_numpy(zero.reshape(-1)), "test"))
    assert pm.zero_point == 0 and torch.equal(repack.unpack(pm), torch.zeros(qt.shape))
    inf = blocks.copy()
    inf[5, :2] = np.array([np.inf], dtype=np.float16).view(np.uint8)
    (pm,) = repack.pack_matrices(QuantizedTensor("inf", "Q8_0", qt.shape, torch.from_numpy(inf.reshape(-1)), "test"))
    assert not pm.half_scales


def test_repack_splits_experts():
    qt = random_blocks("Q4_K", (3, 32, 256), seed=2)
    mats = repack.pack_matrices(qt)
    ref = gguf_dequantize(qt)
    assert len(mats) == 3
    for e, pm in enumerate(mats):
        assert torch.equal(repack.unpack(pm), ref[e])


@pytest.mark.parametrize("bits,tol", [(8, 1e-2), (4, 1.5e-1)])
def test_online_quantization_error_is_bounded(bits, tol):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    (pm,) = repack.pack_matrices(float_tensor(w), bits)
    assert pm.bits == bits
    # symmetric int8 is stored +128: a zero point instead of float mins (1.25 bytes per weight, not 1.5)
    assert pm.zero_point == (128 if bits == 8 else 0)
    if bits == 8:
        assert pm.nbytes == 64 * 256 * 5 // 4
    assert rel_err(repack.unpack(pm), w) < tol


def make_linear(qt) -> tuple[KLinearCPU, KLinearTorch]:
    out_f, in_f = qt.shape
    meta = nn.Linear(in_f, out_f, bias=False, device="meta")
    ours, ref = KLinearCPU(meta), KLinearTorch(meta, dtype=torch.float32)
    ours.load({"weight": qt})
    ref.load({"weight": qt})
    return ours, ref


@pytest.mark.parametrize("type_name", EXACT_TYPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_linear_matches_reference(isa, type_name, tokens):
    qt = random_blocks(type_name, (96, 512), seed=3)
    ours, ref_op = make_linear(qt)
    x = torch.randn(tokens, 512, generator=torch.Generator().manual_seed(tokens))
    y = ours(x)
    ref = F.linear(x, gguf_dequantize(qt))
    assert y.shape == (tokens, 96)
    assert rel_err(y, ref) < TOL
    assert rel_err(y, ref_op(x)) < TOL


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("tokens", (1, 64))
def test_linear_online_int8(isa, type_name, tokens):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(5)) / 16
    qt = float_tensor(w, type_name)
    ours, _ = make_linear(qt)
    x = torch.randn(2, tokens, 256, dtype=torch.bfloat16)
    y = ours(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, tokens, 64)
    assert rel_err(y, F.linear(x.float(), qt.dequantize())) < TOL


@pytest.mark.parametrize("type_name", REQUANTIZED_TYPES)
@pytest.mark.parametrize("tokens", (1, 64))
def test_linear_requantized_types(isa, type_name, tokens):
    """Types without an exact mapping are dequantized (ktcore's dequantizer) and requantized to int8."""
    qt = random_blocks(type_name, (64, 512), seed=7, centered=False)
    ours, _ = make_linear(qt)
    assert ours.weight.bits == 8
    x = torch.randn(tokens, 512)
    assert rel_err(ours(x), F.linear(x, gguf_dequantize(qt))) < TOL


@pytest.mark.parametrize("type_name,k", [("Q8_0", 64), ("Q5_K", 256), ("Q6_K", 256)])
def test_linear_bias_and_odd_rows(isa, type_name, k):
    qt = random_blocks(type_name, (37, k), seed=6)  # 37 rows: not a multiple of the 4-row tile or 32-row block
    meta = nn.Linear(k, 37, bias=True, device="meta")
    op = KLinearCPU(meta)
    bias = torch.randn(37)
    op.load({"weight": qt, "bias": float_tensor(bias, name="b")})
    x = torch.randn(5, k)
    assert rel_err(op(x), F.linear(x, gguf_dequantize(qt), bias)) < TOL


def q5_1_from_q5_0(qt, keep_mins_row: int):
    """The Q5_0 weights as Q5_1 blocks (m = -16 d, exact in fp16), except row ``keep_mins_row`` whose mins
    are set to 0 so that the packer keeps stored mins instead of a zero point."""
    n, k = qt.shape
    b0 = qt.data.numpy().reshape(n, k // 32, 22)
    d = b0[..., 0:2].copy().view(np.float16)
    m = (-16 * d.astype(np.float32)).astype(np.float16)
    m[keep_mins_row] = 0
    b1 = np.concatenate([b0[..., 0:2], m.view(np.uint8), b0[..., 2:]], axis=-1)
    data = torch.from_numpy(np.ascontiguousarray(b1).reshape(-1))
    return QuantizedTensor("q5_1_copy", "Q5_1", (n, k), data, "test")


@pytest.mark.parametrize("tokens", (1, 5))
def test_zero_point_is_bit_identical_to_stored_mins(isa, tokens):
    """Q5_0 packs with zero point 16 (no mins); the same weights as Q5_1 with one row breaking the pattern keep
    their fp16 mins: every other row's outputs must be the same floats."""
    q50 = random_blocks("Q5_0", (40, 512), seed=8)
    q51 = q5_1_from_q5_0(q50, keep_mins_row=0)
    ours_zp, _ = make_linear(q50)
    ours_mins, _ = make_linear(q51)
    assert ours_zp.weight.zero_point == 16 and ours_mins.weight.zero_point == 0
    assert ours_zp.weight.nbytes < ours_mins.weight.nbytes
    x = torch.randn(tokens, 512, generator=torch.Generator().manual_seed(9))
    y_zp, y_mins = ours_zp(x), ours_mins(x)
    assert torch.equal(y_zp[:, 1:], y_mins[:, 1:])
    assert not torch.equal(y_zp[:, 0], y_mins[:, 0])


def test_linear_rejects_wrong_shape():
    op = KLinearCPU(nn.Linear(64, 32, device="meta"))
    with pytest.raises(ValueError, match="random.Q8_0.*shape"):
        op.load({"weight": random_blocks("Q8_0", (32, 128))})


@pytest.mark.parametrize("type_name", ["Q4_1", "Q4_K", "Q5_0", "Q6_K", "Q8_0"])
@pytest.mark.parametrize("tokens,head", [(64, False), (1, True), (3, True), (1, False)])
def test_residual_gives_16_bit_activations(isa, type_name, tokens, head):
    """The integer-dot path quantizes the int8 rounding residual of the activations too (Runtime.act_residual)
    for prefill-sized calls and for the output head at any size: the error falls from int8's (about 1e-2) to
    about 1e-4, below AMX's bf16. Other decode-sized calls stay int8. (AMX takes calls of 16 rows and more in bf16.)"""
    from kt_cpu_amx.runtime import get_runtime

    if isa == "amx" and tokens >= 16:
        pytest.skip("the AMX path computes these in bf16")
    qt = random_blocks(type_name, (96, 512), seed=11)
    ours, _ = make_linear(qt)
    if head:
        ours.declare_output_head()
    w = gguf_dequantize(qt).double()
    x = torch.randn(tokens, 512, generator=torch.Generator().manual_seed(12))
    ref = (x.double() @ w.T).float()
    runtime = get_runtime()
    assert runtime.act_residual
    if tokens <= runtime.decode_rows and not head:
        assert rel_err(ours(x), ref) > 3e-3  # int8
        return
    assert rel_err(ours(x), ref) < 3e-4
    runtime.act_residual = False
    try:
        int8_err = rel_err(ours(x), ref)
    finally:
        runtime.act_residual = True
    assert int8_err > 3e-3
