"""Torch dequantizers of the low-bit GGML types Unsloth's dynamic quants and GPT-OSS use: the i-quants
(IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S), the ternary TQ1_0/TQ2_0 and MXFP4.

Same contract as ``dequant``'s: ``blocks[n_blocks, type_size]`` (uint8) -> float32 ``[n_blocks, block_size]``,
bit-exact with ``gguf.quants.dequantize`` (float products in gguf-py's order). The lattice grids and sign
table are not re-typed: they are read from gguf-py's own classes (``gguf.quants.IQ2_XXS.grid`` ...).

``LOWBIT_DEQUANTIZERS`` is what the GGML type table (``quants``) reads; the per-type facts of these types
(scale fields, lookup tables) are rows of that table.
"""

from __future__ import annotations

import functools

import torch
from gguf.constants import QK_K

from .dequant import _f16, _shifts

MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # e2m1, doubled (ggml's kvalues_mxfp4)
IQ1_DELTA = 0.125


@functools.lru_cache(maxsize=None)
def grid(type_name: str, device: str) -> torch.Tensor:
    """gguf-py's decoded lattice of ``type_name`` as float32 ``[n_points, point_len]``."""
    from gguf import quants

    cls = getattr(quants, type_name)
    cls.init_grid()
    return torch.from_numpy(cls.grid.reshape(cls.grid_shape).copy()).to(device)


@functools.lru_cache(maxsize=None)
def ksigns(device: str) -> torch.Tensor:
    """ggml's ``ksigns_iq2xs``: 128 seven-bit sign patterns with their parity bit, as uint8 ``[128]``."""
    from gguf import quants

    return torch.frombuffer(bytearray(quants.IQ2_XXS.ksigns), dtype=torch.uint8).to(device)


def lookup_tables(type_name: str, device: torch.device | str) -> list[torch.Tensor]:
    """The lookup tables ``type_name``'s blocks index (its ``lookup_tables`` in the GGML type table), on
    ``device``: ``grid(...)`` for a lattice, ``ksigns(...)`` for the sign table; ``[]`` for other types."""
    from .quants import GGML_TYPES

    device = str(device)
    return [ksigns(device) if t == "ksigns" else grid(t, device) for t in GGML_TYPES[type_name].lookup_tables]


def _words(raw: torch.Tensor, width: int) -> torch.Tensor:
    """Little-endian unsigned ``width``-byte words of ``raw[n, k]`` as int64 ``[n, k / width]``."""
    n, k = raw.shape
    b = raw.reshape(n, k // width, width).to(torch.int64)
    out = b[..., 0]
    for i in range(1, width):
        out = out | (b[..., i] << (8 * i))
    return out


def _sign_bits(bytes_: torch.Tensor) -> torch.Tensor:
    """Each byte of ``bytes_[...]`` as 8 float signs (bit clear: +1, set: -1), ``[..., 8]``."""
    bits = (bytes_.unsqueeze(-1) >> _shifts(range(8), bytes_.device, (8,))) & 1
    return 1.0 - 2.0 * bits.to(torch.float32)


def _nibble_scales(scales: torch.Tensor) -> torch.Tensor:
    """Low then high nibble of every byte of ``scales[n, k]``: int64 ``[n, 2k]``."""
    n = scales.shape[0]
    return ((scales.reshape(n, -1, 1) >> _shifts([0, 4], scales.device, (1, 1, 2))) & 0x0F).reshape(n, -1).to(torch.int64)


def _grid_index(low: torch.Tensor, qh: torch.Tensor, bits: int) -> torch.Tensor:
    """Lattice indices: the bytes ``low[n, k]`` plus, as bits 8 and up, the ``bits``-wide fields of the bytes
    ``qh[n, k * bits / 8]`` (lowest field first): int64 ``[n, k]``."""
    n = low.shape[0]
    fields = _shifts(range(0, 8, bits), qh.device, (1, 1, 8 // bits))
    high = ((qh.reshape(n, -1, 1) >> fields) & ((1 << bits) - 1)).reshape(n, -1)
    return low.to(torch.int64) | (high.to(torch.int64) << 8)


def _ksign_lookup(words: torch.Tensor) -> torch.Tensor:
    """The four 7-bit sign indices in bits 0-27 of each uint32 of ``words[n, g]``, as signs ``[n, g, 4, 8]``."""
    idx = (words.unsqueeze(-1) >> torch.tensor([0, 7, 14, 21], device=words.device)) & 0x7F
    return _sign_bits(ksigns(str(words.device))[idx])


def iq2_xxs_blocks(blocks: torch.Tensor) -> torch.Tensor:
    # block_iq2_xxs: d, qs[32] uint16 = 8 pairs of uint32 (4 grid bytes | 4x7 sign bits + 4-bit scale)
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    q = _words(blocks[:, 2:66], 4).reshape(n, 8, 2)
    db = (d * (0.5 + (q[..., 1] >> 28).to(torch.float32)) * 0.25).reshape(n, 8, 1, 1)
    signs = _ksign_lookup(q[..., 1])
    points = grid("IQ2_XXS", str(blocks.device))[blocks[:, 2:66].reshape(n, 8, 8)[:, :, 0:4].to(torch.int64)]
    return (db * points * signs).reshape(n, QK_K)


def iq2_xs_blocks(blocks: torch.Tensor) -> torch.Tensor:
    # block_iq2_xs: d, qs[32] uint16 (9-bit grid index | 7-bit sign index), scales[8] (nibbles)
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    q = _words(blocks[:, 2:66], 2)
    db = (d * (0.5 + _nibble_scales(blocks[:, 66:74]).to(torch.float32)) * 0.25).reshape(n, 16, 1, 1)
    signs = _sign_bits(ksigns(str(blocks.device))[q >> 9]).reshape(n, 16, 2, 8)
    points = grid("IQ2_XS", str(blocks.device))[q & 511].reshape(n, 16, 2, 8)
    return (db * points * signs).reshape(n, QK_K)


def iq2_s_blocks(blocks: torch.Tensor) -> torch.Tensor:
    # block_iq2_s: d, qs[32] (grid index low bytes), signs[32], qh[8] (2 high index bits each), scales[8]
    n = blocks.shape[0]
    dev = blocks.device
    d = _f16(blocks, 0)
    db = (d * (0.5 + _nibble_scales(blocks[:, 74:82]).to(torch.float32)) * 0.25).reshape(n, 16, 1, 1)
    signs = _sign_bits(blocks[:, 34:66]).reshape(n, 16, 2, 8)
    points = grid("IQ2_S", str(dev))[_grid_index(blocks[:, 2:34], blocks[:, 66:74], 2)].reshape(n, 16, 2, 8)
    return (db * points * signs).reshape(n, QK_K)


def iq3_xxs_blocks(blocks: torch.Tensor) -> torch.Tensor:
    # block_iq3_xxs: d, qs[64] (grid indices), then 8 uint32 (4x7 sign bits + 4-bit scale)
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    s = _words(blocks[:, 66:98], 4)
    db = (d * (0.5 + (s >> 28).to(torch.float32)) * 0.5).reshape(n, 8, 1, 1)
    signs = _ksign_lookup(s)
    points = grid("IQ3_XXS", str(blocks.device))[blocks[:, 2:66].to(torch.int64)].reshape(n, 8, 4, 8)
    return (db * points * signs).reshape(n, QK_K)


def iq3_s_blocks(blocks: torch.Tensor) -> torch.Tensor:
    # block_iq3_s: d, qs[64] (grid index low bytes), qh[8] (9th index bit), signs[32], scales[4]
    n = blocks.shape[0]
    dev = blocks.device
    d = _f16(blocks, 0)
    db = (d * (1 + 2 * _nibble_scales(blocks[:, 106:110])).to(torch.float32)).reshape(n, 8, 1, 1)
    signs = _sign_bits(blocks[:, 74:106]).reshape(n, 8, 4, 8)
    points = grid("IQ3_S", str(dev))[_grid_index(blocks[:, 2:66], blocks[:, 66:74], 1)].reshape(n, 8, 4, 8)
    return (db * points * signs).reshape(n, QK_K)


def iq1_s_blocks(blocks: torch.Tensor) -> torch.Tensor:
    # block_iq1_s: d, qs[32] (grid index low bytes), qh[8] uint16 (4x3 high index bits, 3-bit scale, delta sign)
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    qh = _words(blocks[:, 34:50], 2)
    dl = (d * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)).reshape(n, 8, 1, 1)
    delta = torch.where((qh & 0x8000) == 0, IQ1_DELTA, -IQ1_DELTA).reshape(n, 8, 1, 1)
    high = (qh.unsqueeze(-1) >> torch.tensor([0, 3, 6, 9], device=blocks.device)) & 7
    idx = blocks[:, 2:34].to(torch.int64) | (high.reshape(n, 32) << 8)
    points = grid("IQ1_S", str(blocks.device))[idx].reshape(n, 8, 4, 8)
    return (dl * (points + delta)).reshape(n, QK_K)


def iq1_m_blocks(blocks: torch.Tensor) -> torch.Tensor:
    # block_iq1_m: qs[32], qh[16] (two nibbles: 3 high index bits + delta sign), scales[4] uint16: 4x3-bit
    # sub-scales each, and the block's f16 scale spread over their top nibbles
    n = blocks.shape[0]
    dev = blocks.device
    s = _words(blocks[:, 48:56], 2)
    d_bits = ((s & 0xF000) >> torch.tensor([12, 8, 4, 0], device=dev)).sum(-1)  # disjoint nibbles: sum == or
    d_bytes = torch.stack([d_bits & 0xFF, d_bits >> 8], dim=-1).to(torch.uint8)
    d = d_bytes.view(torch.float16).to(torch.float32).reshape(n, 1)
    sc = ((s.unsqueeze(-1) >> torch.tensor([0, 3, 6, 9], device=dev)) & 7).reshape(n, 16)
    dl = (d * (2 * sc + 1).to(torch.float32)).reshape(n, 8, 2, 1, 1)
    qh = (blocks[:, 32:48].reshape(n, 16, 1) >> _shifts([0, 4], dev, (1, 1, 2))).reshape(n, 32)
    idx = blocks[:, 0:32].to(torch.int64) | ((qh & 7).to(torch.int64) << 8)
    delta = torch.where((qh & 8) == 0, IQ1_DELTA, -IQ1_DELTA).reshape(n, 8, 2, 2, 1)
    points = grid("IQ1_S", str(dev))[idx].reshape(n, 8, 2, 2, 8)
    return (dl * (points + delta)).reshape(n, QK_K)


def _times_mod256(q: torch.Tensor, factors) -> torch.Tensor:
    """``q[..., 1, k] * factors`` in uint8 arithmetic (wrapping), as ggml's ternary unpacking does: ``[..., f, k]``."""
    f = torch.tensor(factors, dtype=torch.int32, device=q.device).reshape(len(factors), 1)
    return (q.to(torch.int32) * f) & 0xFF


def tq1_0_blocks(blocks: torch.Tensor) -> torch.Tensor:
    # block_tq1_0: qs[48] (5 trits per byte, base-3 fixed point), qh[4] (4 trits per byte), d
    n = blocks.shape[0]
    d = _f16(blocks, 52)
    q0 = _times_mod256(blocks[:, 0:32].reshape(n, 1, 32), [1, 3, 9, 27, 81]).reshape(n, 160)
    q1 = _times_mod256(blocks[:, 32:48].reshape(n, 1, 16), [1, 3, 9, 27, 81]).reshape(n, 80)
    qh = _times_mod256(blocks[:, 48:52].reshape(n, 1, 4), [1, 3, 9, 27]).reshape(n, 16)
    q = torch.cat([q0, q1, qh], dim=-1)
    trit = ((q * 3) >> 8) - 1
    return d * trit.to(torch.float32)


def tq2_0_blocks(blocks: torch.Tensor) -> torch.Tensor:
    # block_tq2_0: qs[64] (4 two-bit values per byte), d
    n = blocks.shape[0]
    d = _f16(blocks, 64)
    q = (blocks[:, 0:64].reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], blocks.device, (1, 1, 4, 1))) & 3
    return d * (q.reshape(n, QK_K).to(torch.int8) - 1).to(torch.float32)


def mxfp4_blocks(blocks: torch.Tensor) -> torch.Tensor:
    # block_mxfp4: e (e8m0 shared exponent), qs[16] (e2m1 nibbles: first 16 values low, last 16 high)
    n = blocks.shape[0]
    e = blocks[:, 0:1].to(torch.int32)
    # ggml_e8m0_to_fp32_half: 2^(e-128), i.e. half the e8m0 scale (the e2m1 table is doubled); subnormal below 2
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    d = bits.view(torch.float32)
    q = (blocks[:, 1:17].reshape(n, 1, 16) >> _shifts([0, 4], blocks.device, (1, 2, 1))) & 0x0F
    values = torch.tensor(MXFP4_VALUES, dtype=torch.float32, device=blocks.device)
    return d * values[q.reshape(n, 32).to(torch.int64)]


LOWBIT_DEQUANTIZERS = {
    "IQ1_S": iq1_s_blocks,
    "IQ1_M": iq1_m_blocks,
    "IQ2_XXS": iq2_xxs_blocks,
    "IQ2_XS": iq2_xs_blocks,
    "IQ2_S": iq2_s_blocks,
    "IQ3_XXS": iq3_xxs_blocks,
    "IQ3_S": iq3_s_blocks,
    "TQ1_0": tq1_0_blocks,
    "TQ2_0": tq2_0_blocks,
    "MXFP4": mxfp4_blocks,
}


def random_lowbit_blocks(rng, type_name: str, n_blocks: int, scale: float = 1.0, signed: bool = False):
    """Random bytes of ``n_blocks`` valid blocks of ``type_name`` (numpy uint8 ``[n, type_size]``) whose
    block scales are finite and about ``scale`` (times a random factor in [0.5, 1), and a random sign if
    ``signed``; MXFP4's e8m0 scale is always positive): every index, sign and sub-scale pattern is a legal
    block, so random bytes are valid once the scale fields are."""
    import numpy as np

    from .quants import GGML_TYPES

    info = GGML_TYPES[type_name]
    blocks = rng.integers(0, 256, size=(n_blocks, info.type_size), dtype=np.uint8)
    d = scale * rng.uniform(0.5, 1.0, size=n_blocks)
    if signed:
        d *= rng.choice([-1.0, 1.0], size=n_blocks)
    d = d.astype(np.float16)
    for at in info.scale_fields:
        blocks[:, at : at + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    if type_name == "IQ1_M":  # nibble k of the f16 goes to the top nibble of scale word k (bytes 49, 51, 53, 55)
        bits = d.view(np.uint16).astype(np.uint16)
        for k in range(4):
            byte = 49 + 2 * k
            blocks[:, byte] = (blocks[:, byte] & 0x0F) | (((bits >> (4 * k)) & 0x0F).astype(np.uint8) << 4)
    if type_name == "MXFP4":  # e8m0 exponent: values are 2^(e-128) times the doubled e2m1 table
        blocks[:, 0] = np.clip(np.rint(128 + np.log2(np.abs(d).astype(np.float32))), 2, 250).astype(np.uint8)
    return blocks
