"""One GGUF weight matrix as torch's XPU int4 weight-only GEMM wants it.

``aten::_weight_int4pack_mm_with_scales_and_zeros(x[M, K], packed, group, scale, zeros)`` computes
``x @ ((q - zeros) * scale).T`` where ``q`` are unsigned 4-bit weights, ``scale`` is ``[K / group, N]`` in the
activation dtype and ``zeros`` ``[K / group, N]`` int8. ``packed`` comes from
``aten::_convert_weight_to_int4pack(nibbles, 8)`` with ``nibbles`` uint8 ``[N, K / 2]``: weight ``k`` of row
``n`` is the low nibble of byte ``k // 2`` when ``k`` is even, the high nibble when odd. (Source: torchao's
``Int4PlainInt32Tensor``, the XPU user of these ops; the kernels themselves live in torch-xpu-ops.)

GGUF's per-group constant (Q4_1's min, Q4_K's sub-block mins) has no place in an integer zero point; rather
than requantize, it is added exactly as a second, small product: ``(x summed over each group) @ bias``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ktcore.sdk import INT4_TYPES, AffineGroups, affine_groups

from ._env import int4_kernels_missing

if TYPE_CHECKING:
    from ktcore.sdk import QuantizedTensor

ZERO_POINT = 8  # codes c in [-8, 7] are stored as c + 8


@dataclass(frozen=True)
class Int4Weight:
    """``w[n, k] = (q[n, k] - 8) * scale[k // g, n] + bias[k // g, n]`` with ``q`` packed two per byte."""

    nibbles: torch.Tensor  # uint8 [N, K / 2]
    scale: torch.Tensor  # float32 [K / g, N]
    zeros: torch.Tensor  # int8 [K / g, N], all ZERO_POINT
    bias: torch.Tensor | None  # float32 [K / g, N]
    group_size: int

    @classmethod
    def from_groups(cls, groups: AffineGroups) -> "Int4Weight":
        if groups.bits != 4 or groups.codes.dim() != 2:
            raise ValueError(f"expected 4-bit codes of a matrix, got {groups.bits}-bit codes of shape {tuple(groups.codes.shape)}")
        q = (groups.codes.to(torch.int16) + ZERO_POINT).to(torch.uint8)
        return cls(
            nibbles=pack_nibbles(q),
            scale=groups.scale.t().contiguous(),
            zeros=torch.full(groups.scale.t().shape, ZERO_POINT, dtype=torch.int8),
            bias=None if groups.bias is None else groups.bias.t().contiguous(),
            group_size=groups.group_size,
        )

    def dequantize(self) -> torch.Tensor:
        """Float32 ``[N, K]`` from the packed form (the torch reference of the kernel's weight)."""
        g = self.group_size
        w = (unpack_nibbles(self.nibbles).float() - self.zeros.t().float().repeat_interleave(g, dim=1)) * self.scale.t().repeat_interleave(g, dim=1)
        if self.bias is not None:
            w = w + self.bias.t().repeat_interleave(g, dim=1)
        return w


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K]`` values in 0..15 -> ``[N, K / 2]``: even k in the low nibble, odd k in the high one."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


class XPUKernels:
    """torch's XPU int4 ops."""

    @staticmethod
    def pack(nibbles: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), 8)

    @staticmethod
    def matmul(x, packed, group_size: int, scale, zeros) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_with_scales_and_zeros(x, packed, group_size, scale, zeros)


class ReferenceKernels:
    """``XPUKernels``' contract in plain torch (weights kept as nibbles): the reference of the device tests
    and what the CPU tests run the ops with."""

    @staticmethod
    def pack(nibbles: torch.Tensor) -> torch.Tensor:
        return nibbles

    @staticmethod
    def matmul(x, packed, group_size: int, scale, zeros) -> torch.Tensor:
        q = unpack_nibbles(packed).float()
        w = (q - zeros.t().float().repeat_interleave(group_size, dim=1)) * scale.t().float().repeat_interleave(group_size, dim=1)
        return (x.float() @ w.t()).to(x.dtype)


class XPUQuantMatrix:
    """A ``[N, K]`` GGUF weight on ``device``: int4 when its type is a 4-bit one and the kernels exist,
    else dense. ``matmul(x[M, K]) -> [M, N]`` in ``compute_dtype``."""

    def __init__(self, qt: "QuantizedTensor", device, compute_dtype: torch.dtype, kernels=None):
        self.name = qt.name
        self.shape = tuple(int(s) for s in qt.shape)
        if len(self.shape) != 2:
            raise ValueError(f"{qt.name}: expected a matrix [out, in], got shape {self.shape}")
        self.compute_dtype = compute_dtype
        self.kernels = kernels if kernels is not None else (None if int4_kernels_missing() else XPUKernels)
        self.quantized = qt.ggml_type in INT4_TYPES and self.kernels is not None
        if self.quantized:
            w = Int4Weight.from_groups(affine_groups(qt.data, qt.ggml_type, self.shape, qt.name))
            self.packed = self.kernels.pack(w.nibbles.to(device))
            self.scale = w.scale.to(device=device, dtype=compute_dtype)
            self.zeros = w.zeros.to(device)
            self.bias = None if w.bias is None else w.bias.to(device)
            self.group_size = w.group_size
        else:
            self.weight = qt.dequantize(dtype=compute_dtype, device=device)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype).contiguous()
        if not self.quantized:
            return torch.nn.functional.linear(x, self.weight)
        y = self.kernels.matmul(x, self.packed, self.group_size, self.scale, self.zeros)
        if self.bias is not None:
            group_sums = x.float().reshape(x.shape[0], -1, self.group_size).sum(-1)
            y = (y.float() + group_sums @ self.bias).to(self.compute_dtype)
        return y
