"""The int4 weight layout of ``KLinearMarlin`` and ``KExpertsGPU``, and the ways into it.

A weight ``[..., N, K]`` is stored as

- ``qweight`` uint8 ``[..., N, K/2]``: byte ``j`` of a row holds weight ``2j`` (low nibble) and ``2j+1``
  (high nibble), values 0..15;
- ``scales`` ``[..., N, K/G]`` and, for asymmetric groups, ``mins`` ``[..., N, K/G]``, so that
  ``w = scale * q - min``; without ``mins``, ``w = scale * (q - zero_point)``.

GGUF Q4_0 (``d*(q-8)``), Q4_1 (``d*q + m``) and Q4_K (``d*sc*q - dmin*m`` over sub-blocks of 32) all map
to G = 32 exactly. Scales are kept in float16 when that is lossless (Q4_0, Q4_1), else float32 (Q4_K's
``d*sc`` needs up to 17 significant bits), unless the caller asks for a narrower dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ggml_blocks import INT4_TYPES, split_int4

GROUP_SIZES = (32, 64, 128)


@dataclass
class Int4Weight:
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    group_size: int
    zero_point: int = 8

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.qweight.shape[:-1], self.qweight.shape[-1] * 2)

    def to(self, device) -> "Int4Weight":
        return Int4Weight(
            self.qweight.to(device),
            self.scales.to(device),
            None if self.mins is None else self.mins.to(device),
            self.group_size,
            self.zero_point,
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.mins) if t is not None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Reference expansion in float32: ``scale * q - min``."""
        q = unpack_nibbles(self.qweight).float()
        s = self.scales.float().repeat_interleave(self.group_size, dim=-1)
        m = (self.mins.float() if self.mins is not None else self.scales.float() * self.zero_point)
        m = m.repeat_interleave(self.group_size, dim=-1)
        return (s * q - m).to(dtype)


def with_layout(w: Int4Weight, k_major: bool) -> Int4Weight:
    """The same weight with its packed bytes stored K-major (``qweight`` a transposed view of a
    contiguous ``[..., K/2, N]``: bytes of one K position are adjacent across outputs) or N-major."""
    q = w.qweight
    if k_major:
        q = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        q = q.contiguous()
    return Int4Weight(q, w.scales, w.mins, w.group_size, w.zero_point)


def is_k_major(w: Int4Weight) -> bool:
    return w.qweight.stride(-1) != 1


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., K]`` with values 0..15 -> ``[..., K/2]``, weight 2j low and 2j+1 high."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 0x0F, p >> 4], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def _narrow(t: torch.Tensor, scales_dtype) -> torch.Tensor:
    """float32 ``t`` in ``scales_dtype``; ``"auto"`` keeps float32 unless float16 holds every value exactly."""
    if scales_dtype == "auto":
        half = t.to(torch.float16)
        return half if torch.equal(half.float(), t) else t
    return t.to(scales_dtype)


def from_ggml(raw: torch.Tensor, ggml_type: str, shape, scales_dtype="auto", name: str = "") -> Int4Weight:
    """Repack raw Q4_0 / Q4_1 / Q4_K blocks (on any device) into an ``Int4Weight`` on the same device."""
    q, scale, mn = split_int4(raw, ggml_type, tuple(shape), name)
    scales = _narrow(scale, scales_dtype)
    if ggml_type == "Q4_0":  # min = 8 * scale exactly: let the kernel derive it
        return Int4Weight(pack_nibbles(q), scales, None, 32, zero_point=8)
    mins = _narrow(mn, scales_dtype)
    if mins.dtype != scales.dtype:
        common = torch.promote_types(mins.dtype, scales.dtype)
        scales, mins = scales.to(common), mins.to(common)
    return Int4Weight(pack_nibbles(q), scales, mins, 32)


def quantize(w: torch.Tensor, group_size: int = 128, symmetric: bool = False, scales_dtype=torch.float16) -> Int4Weight:
    """Round-to-nearest int4 of a float weight ``[..., N, K]`` (for weights that come unquantized).

    Asymmetric groups map [min, max] onto 0..15; symmetric ones map [-amax, amax] with zero point 8.
    """
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if w.shape[-1] % group_size:
        raise ValueError(f"in_features {w.shape[-1]} is not a multiple of the group size {group_size}")
    g = w.float().reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    if symmetric:
        scale = (g.abs().amax(-1) / 7.5).clamp_min(1e-10).to(scales_dtype).float()
        q = torch.round(g / scale.unsqueeze(-1) + 8).clamp(0, 15).to(torch.uint8)
        return Int4Weight(pack_nibbles(q.reshape(w.shape)), scale.to(scales_dtype), None, group_size, 8)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-10).to(scales_dtype).float()
    mn = (-lo).to(scales_dtype).float()  # w = scale*q - mn, so q = (w + mn)/scale
    q = torch.round((g + mn.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15).to(torch.uint8)
    return Int4Weight(pack_nibbles(q.reshape(w.shape)), scale.to(scales_dtype), mn.to(scales_dtype), group_size)


def concat(parts: list[Int4Weight], dim: int = -2) -> Int4Weight:
    """Join weights along an output dimension (gate and up of an MoE), harmonizing their scale formats."""
    if len({p.group_size for p in parts}) != 1:
        raise ValueError(f"cannot join int4 weights of group sizes {[p.group_size for p in parts]}")
    dtype = parts[0].scales.dtype
    for p in parts[1:]:
        dtype = torch.promote_types(dtype, p.scales.dtype)
    same_zp = len({p.zero_point for p in parts}) == 1
    if all(p.mins is None for p in parts) and same_zp:
        mins = None
    else:
        mins = torch.cat([(p.mins if p.mins is not None else p.scales.float() * p.zero_point).to(dtype) for p in parts], dim=dim)
    return Int4Weight(
        torch.cat([p.qweight for p in parts], dim=dim),
        torch.cat([p.scales.to(dtype) for p in parts], dim=dim),
        mins,
        parts[0].group_size,
        parts[0].zero_point,
    )


def is_int4_type(ggml_type: str) -> bool:
    return ggml_type in INT4_TYPES
