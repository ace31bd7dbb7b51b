"""Reference dequantizers in torch: vectorized, on any device, bit-exact with ``gguf.quants.dequantize``.

Each ``*_blocks`` function takes ``blocks[n_blocks, type_size]`` (uint8) and returns float32
``[n_blocks, block_size]``. The float operations are done in float32 in the same order as ggml's
reference (and gguf-py's) so the results match bit for bit; integer unpacking is done on uint8/int32 only,
since torch's shifts on wider unsigned types are limited. Layouts are those of ggml's ``block_*`` structs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf.constants import QK_K

from .source import WeightError
from .tensor import QuantizedTensor

IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian f16 at byte ``start`` of every block, as float32 ``[n, 1]``."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).to(torch.float32)


def _shifts(values, device, shape) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device).reshape(shape)


def _nibbles(qs: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """Split ``qs[n, groups*width]`` into its low then high nibbles per group: ``[n, groups, 2, width]``."""
    n = qs.shape[0]
    return (qs.reshape(n, groups, 1, width) >> _shifts([0, 4], qs.device, (1, 1, 2, 1))) & 0x0F


def _bits(packed: torch.Tensor) -> torch.Tensor:
    """Bit ``i`` of the little-endian bit string ``packed[n, k]``, as uint8 ``[n, 8*k]``."""
    n, k = packed.shape
    bits = (packed.reshape(n, k, 1) >> _shifts(range(8), packed.device, (1, 1, 8))) & 1
    return bits.reshape(n, 8 * k)


def f32_blocks(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)


def f16_blocks(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).to(torch.float32)


def bf16_blocks(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.bfloat16).to(torch.float32)


def f8_e4m3_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """float8 e4m3fn bytes, unscaled (their block scales are applied by ``fp8.dequantize``)."""
    return blocks.contiguous().view(torch.float8_e4m3fn).to(torch.float32)


def q4_0_blocks(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:18], 1, 16).reshape(n, 32).to(torch.int8) - 8
    return d * q.to(torch.float32)


def q4_1_blocks(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:20], 1, 16).reshape(n, 32).to(torch.float32)
    return (d * q) + m


def _q5_values(blocks: torch.Tensor, qh_at: int) -> torch.Tensor:
    n = blocks.shape[0]
    qh = _bits(blocks[:, qh_at : qh_at + 4])  # element j's fifth bit is bit j of the uint32
    ql = _nibbles(blocks[:, qh_at + 4 : qh_at + 20], 1, 16).reshape(n, 32)
    return ql | (qh << 4)


def q5_0_blocks(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = _q5_values(blocks, 2).to(torch.int8) - 16
    return d * q.to(torch.float32)


def q5_1_blocks(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _q5_values(blocks, 4).to(torch.float32)
    return (d * q) + m


def q8_0_blocks(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = blocks[:, 2:34].contiguous().view(torch.int8).to(torch.float32)
    return q * d


def q2_k_blocks(blocks: torch.Tensor) -> torch.Tensor:
    # block_q2_K: scales[16] (4-bit scale | 4-bit min), qs[64], d, dmin
    n = blocks.shape[0]
    scales = blocks[:, 0:16]
    qs = blocks[:, 16:80]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = (qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], blocks.device, (1, 1, 4, 1))) & 3
    q = q.reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def q3_k_blocks(blocks: torch.Tensor) -> torch.Tensor:
    # block_q3_K: hmask[32], qs[64], scales[12] (16 6-bit scales), d
    n = blocks.shape[0]
    dev = blocks.device
    hmask, qs, scales = blocks[:, 0:32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks, 108)
    low = (scales[:, 0:8].reshape(n, 1, 8) >> _shifts([0, 4], dev, (1, 2, 1))).reshape(n, 16) & 0x0F
    high = (scales[:, 8:12].reshape(n, 1, 4) >> _shifts([0, 2, 4, 6], dev, (1, 4, 1))).reshape(n, 16) & 0x03
    sc = ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (d * sc).reshape(n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], dev, (1, 1, 4, 1))).reshape(n, 16, 16) & 3
    qh = (hmask.reshape(n, 1, 1, 32) >> _shifts(range(8), dev, (1, 1, 8, 1))).reshape(n, 16, 16) & 1
    # a cleared hmask bit means "subtract 4"
    q = (ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (Q4_K, Q5_K), as float32 ``[n, 8, 1]`` each."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.to(torch.float32).reshape(n, 8, 1), mn.to(torch.float32).reshape(n, 8, 1)


def q4_k_blocks(blocks: torch.Tensor) -> torch.Tensor:
    # block_q4_K: d, dmin, scales[12], qs[128]
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dl = d.reshape(n, 1, 1) * sc
    ml = dmin.reshape(n, 1, 1) * mn
    q = _nibbles(blocks[:, 16:144], 4, 32).reshape(n, 8, 32).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def q5_k_blocks(blocks: torch.Tensor) -> torch.Tensor:
    # block_q5_K: d, dmin, scales[12], qh[32], qs[128]
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dl = d.reshape(n, 1, 1) * sc
    ml = dmin.reshape(n, 1, 1) * mn
    ql = _nibbles(blocks[:, 48:176], 4, 32).reshape(n, 8, 32)
    qh = (blocks[:, 16:48].reshape(n, 1, 1, 32) >> _shifts(range(8), blocks.device, (1, 1, 8, 1))) & 1
    q = (ql | (qh.reshape(n, 8, 32) << 4)).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def q6_k_blocks(blocks: torch.Tensor) -> torch.Tensor:
    # block_q6_K: ql[128], qh[64], scales[16] (int8), d
    n = blocks.shape[0]
    ql = _nibbles(blocks[:, 0:128], 2, 64).reshape(n, 8, 32)
    qh = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], blocks.device, (1, 1, 4, 1))) & 3
    scales = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = _f16(blocks, 208)
    dl = (d * scales).reshape(n, 16, 1)
    q = ((ql | (qh.reshape(n, 8, 32) << 4)).to(torch.int8) - 32).reshape(n, 16, 16).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def iq4_nl_blocks(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    idx = _nibbles(blocks[:, 2:18], 1, 16).reshape(n, 32).to(torch.int64)
    values = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=blocks.device)
    return d * values[idx]


def iq4_xs_blocks(blocks: torch.Tensor) -> torch.Tensor:
    # block_iq4_xs: d, scales_h (uint16: 2 high bits per sub-block), scales_l[4] (nibbles), qs[128]
    n = blocks.shape[0]
    dev = blocks.device
    d = _f16(blocks, 0)
    high = (blocks[:, 2:4].reshape(n, 2, 1) >> _shifts([0, 2, 4, 6], dev, (1, 1, 4))).reshape(n, 8) & 0x03
    low = (blocks[:, 4:8].reshape(n, 4, 1) >> _shifts([0, 4], dev, (1, 1, 2))).reshape(n, 8) & 0x0F
    sc = ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (d * sc).reshape(n, 8, 1)
    idx = _nibbles(blocks[:, 8:136], 8, 16).reshape(n, 8, 32).to(torch.int64)
    values = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=dev)
    return (dl * values[idx]).reshape(n, QK_K)


# Faster dequantizers contributed by plugins (hook ``register_dequantizers``): (type, device type) -> fn
_FAST: dict[tuple[str, str], Callable] = {}


def register_dequantizer(ggml_type: str, device_type: str, fn: Callable) -> None:
    """``fn(raw_uint8, shape, dtype) -> tensor`` replaces the reference dequantizer for that type on that
    device type."""
    _FAST[(ggml_type, device_type)] = fn


def dequantize_raw(
    raw: torch.Tensor,
    ggml_type: str,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    *,
    what: str = "tensor",
) -> torch.Tensor:
    """Expand raw GGML bytes of type ``ggml_type`` into a ``shape`` tensor of ``dtype`` on ``device``.

    ``what`` names the tensor and file in errors."""
    from .quants import GGML_TYPES

    info = GGML_TYPES.get(ggml_type)
    if info is None or info.dequantize_blocks is None:
        from .quants import DEQUANTIZABLE

        nearest = info.nearest_supported if info is not None else None
        hint = f"; nearest supported type: {nearest} (re-quantize this tensor to it)" if nearest else ""
        raise WeightError(
            f"{what}: GGML type {ggml_type} is not supported{hint} (supported: {', '.join(sorted(DEQUANTIZABLE))})"
        )
    n_elements = 1
    for s in shape:
        n_elements *= int(s)
    if n_elements % info.block_size:
        raise WeightError(f"{what}: {n_elements} elements is not a whole number of {ggml_type} blocks of {info.block_size}")
    expected = info.nbytes(n_elements)
    if raw.numel() != expected:
        raise WeightError(f"{what}: {ggml_type} {tuple(shape)} needs {expected} bytes, got {raw.numel()}")
    if device is not None:
        raw = raw.to(device)
    fast = _FAST.get((ggml_type, raw.device.type))
    if fast is not None:
        return fast(raw, tuple(shape), dtype)
    out = info.dequantize_blocks(raw.reshape(-1, info.type_size))
    return out.reshape(shape).to(dtype)


def dequantize(
    qt: QuantizedTensor, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The values of ``qt`` as a plain tensor (its logical shape, ``dtype``, on ``device``)."""
    if qt.ggml_type == "F8_E4M3":  # block scales beside the bytes (ktcore/weights/fp8.py)
        from .fp8 import dequantize as fp8_dequantize

        return fp8_dequantize(qt, dtype, device)
    what = f"tensor {qt.name!r}" + (f" in {qt.source}" if qt.source else "")
    return dequantize_raw(qt.data, qt.ggml_type, qt.shape, dtype, device, what=what)
