"""The integer-dot decode path (one token) for Q4_K's two-level scales, float for float: the kernel's outputs
against a numpy emulation of its arithmetic (int8 activations per block of 32, int32 lanes of products, one fused
multiply-add per group and lane with the float product (d * sc) * d_x, the lane sums in the kernel's order, the
min term sum_g (-dmin * m) * block_sum), so that a change to the kernels that changes any float of the decode path
fails here. AVX2 (ymm): 8 lanes of 4 products per group. AVX512 (zmm, AMX's decode too): 4 lanes of 8 products per
group (elements 4j..4j+3 and 16+4j..16+4j+3), group g in lanes 4 (g % 4)..; the min term in 16 lanes, group g in
lane g % 16. Also: a token's outputs do not depend on the token tile it is computed in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cpu_amx_helpers import random_blocks
from torch import nn

from kt_cpu_amx.ops import KLinearCPU

f32 = np.float32


def make_linear(qt) -> KLinearCPU:
    out_f, in_f = qt.shape
    op = KLinearCPU(nn.Linear(in_f, out_f, bias=False, device="meta"))
    op.load({"weight": qt})
    return op


def quantize_act(x: np.ndarray):
    """The kernels' int8 activations of x [k]: per block of 32, d = amax / 127, q = rint(x * (127 / amax)),
    block sums d * sum(q), all in float32."""
    xb = x.reshape(-1, 32).astype(f32)
    amax = np.abs(xb).max(axis=1)
    d = (amax / f32(127)).astype(f32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, f32(127) / amax, f32(0)).astype(f32)
    q = np.rint((xb * inv[:, None]).astype(f32)).astype(np.int32)
    s32 = (d * q.sum(axis=1).astype(f32)).astype(f32)
    return q, d, s32


def q4k_fields(qt):
    """Per row: quants q [G, 32] in activation order, sub-scales sc, m [G] (6-bit), d, dmin [G / 8] (fp16)."""
    n, k = qt.shape
    blk = qt.data.numpy().reshape(n, k // 256, 144)
    d = blk[..., 0:2].copy().view(np.float16)[..., 0].astype(f32)
    dmin = blk[..., 2:4].copy().view(np.float16)[..., 0].astype(f32)
    s = blk[..., 4:16].astype(np.int32)
    sc = np.empty((n, k // 256, 8), np.int32)
    m = np.empty_like(sc)
    sc[..., :4], m[..., :4] = s[..., 0:4] & 63, s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    m[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    qs = blk[..., 16:].reshape(n, k // 256, 4, 32)
    q = np.stack([qs & 0xF, qs >> 4], axis=3).reshape(n, k // 32, 32).astype(np.int32)  # sub-block 2j, 2j + 1
    return q, sc.reshape(n, -1), m.reshape(n, -1), d, dmin


def fma(a, b, c):
    """float32 a * b + c rounded once (exact product and sum in float64 for these magnitudes, then one rounding
    to float32: a double rounding could differ only on an exact float32 midpoint)."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(f32)


def hsum(v):
    """The kernels' horizontal sum of 8 lanes: (l0 + l4) + (l2 + l6), (l1 + l5) + (l3 + l7), then those two."""
    h = (v[..., 0:4] + v[..., 4:8]).astype(f32)
    h = (h[..., 0:2] + h[..., 2:4]).astype(f32)
    return (h[..., 0] + h[..., 1]).astype(f32)


def emulate_decode(qt, x: np.ndarray) -> np.ndarray:
    q, sc, m, d, dmin = q4k_fields(qt)
    n, G = sc.shape
    xq, xd, s32 = quantize_act(x)
    scale = (np.repeat(d, 8, axis=1) * sc.astype(f32)).astype(f32)       # [n, G]: d * sc
    mins = (np.repeat(-dmin, 8, axis=1) * m.astype(f32)).astype(f32)     # -dmin * m
    lanes = (q * xq[None]).reshape(n, G, 8, 4).sum(axis=3).astype(f32)   # [n, G, 8]: int32 lanes, exact
    acc = np.zeros((n, 8), f32)
    for g in range(G):
        acc = fma(lanes[:, g], (scale[:, g] * xd[g]).astype(f32)[:, None], acc)
    macc = np.zeros((n, 8), f32)
    for g0 in range(0, G, 8):
        macc = fma(mins[:, g0:g0 + 8], s32[None, g0:g0 + 8], macc)
    return (hsum(acc) + hsum(macc)).astype(f32)


def hsum16(v):
    """The zmm kernel's horizontal sum: lanes l + (l + 8), then hsum."""
    return hsum((v[..., 0:8] + v[..., 8:16]).astype(f32))


def emulate_decode_zmm(qt, x: np.ndarray) -> np.ndarray:
    q, sc, m, d, dmin = q4k_fields(qt)
    n, G = sc.shape
    xq, xd, s32 = quantize_act(x)
    scale = (np.repeat(d, 8, axis=1) * sc.astype(f32)).astype(f32)
    mins = (np.repeat(-dmin, 8, axis=1) * m.astype(f32)).astype(f32)
    lanes = (q * xq[None]).reshape(n, G, 2, 4, 4).sum(axis=(2, 4)).astype(f32)  # [n, G, 4]
    acc = np.zeros((n, 16), f32)
    for g in range(G):
        at = slice(4 * (g % 4), 4 * (g % 4) + 4)
        acc[:, at] = fma(lanes[:, g], (scale[:, g] * xd[g]).astype(f32)[:, None], acc[:, at])
    macc = np.zeros((n, 16), f32)
    for g in range(G):
        macc[:, g % 16] = fma(mins[:, g], s32[g], macc[:, g % 16])
    return (hsum16(acc) + hsum16(macc)).astype(f32)


@pytest.mark.parametrize("n,k", [(38, 512), (8, 2048)])
def test_q4k_decode_matches_emulation_bit_for_bit(isa, n, k):
    qt = random_blocks("Q4_K", (n, k), seed=11, centered=False)
    op = make_linear(qt)
    assert op.weight.sub8_scales
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(12))
    for row in x:  # decode: one token per call
        y = op(row[None])[0].numpy()
        ref = (emulate_decode if isa == "avx2" else emulate_decode_zmm)(qt, row.numpy())
        assert np.array_equal(y, ref), f"max abs diff {np.abs(y - ref).max():.3g}"


@pytest.mark.parametrize("type_name,k", [("Q4_K", 512), ("Q4_0", 288), ("Q4_1", 1024), ("Q5_K", 512),
                                         ("Q6_K", 256), ("Q8_0", 288), ("Q5_1", 512)])
def test_decode_outputs_do_not_depend_on_token_tile(isa, type_name, k):
    """One token alone (tile of one token) and the same token among 2-5 (tiles of 2 or 4 plus remainders):
    the same floats. k = 288: 9 blocks of 32, 8 in the scale-expanded loop and one after it."""
    qt = random_blocks(type_name, (38, k), seed=13)
    op = make_linear(qt)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(14))
    alone = torch.cat([op(x[t:t + 1]) for t in range(5)])
    for m in (2, 3, 4, 5):
        assert torch.equal(op(x[:m]), alone[:m]), f"{m} tokens"
