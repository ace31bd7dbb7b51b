"""One GGUF weight matrix held as ``torch_npu.npu_weight_quant_batchmatmul`` wants it.

The kernel computes ``y = x @ ((weight + antiquant_offset) * antiquant_scale)`` with ``weight`` ``[K, N]``
(int8, or int4 carried in int32 as ``npu_convert_weight_to_int4pack`` packs it), and scale/offset of
shape ``[K / group, N]`` in the activation dtype (float16 or bfloat16). Sources: the torch_npu API pages
for ``npu_weight_quant_batchmatmul`` and ``npu_convert_weight_to_int4pack`` and op-plugin's own test
reference, ``(weight + offset) * scale``.

``AntiquantWeight`` is the device-independent part (integers, scale, offset: derived and testable on
the CPU); ``AscendKernels`` are the two vendor calls, ``ReferenceKernels`` the same contract in torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ktcore.sdk import AFFINE_TYPES, INT4_TYPES, AffineGroups, affine_groups

from ._env import torch_npu

if TYPE_CHECKING:
    from ktcore.sdk import QuantizedTensor

# npu_weight_quant_batchmatmul's per-group mode: group size a multiple of 32 and below K
MIN_GROUP = 32


@dataclass(frozen=True)
class AntiquantWeight:
    """``w[n, k] = (codes[k, n] + offset[k // g, n]) * scale[k // g, n]`` (``offset`` None: 0)."""

    codes: torch.Tensor  # [K, N]: int32 holding int4 values when bits == 4, else int8
    scale: torch.Tensor  # float32 [K / group, N]
    offset: torch.Tensor | None  # float32 [K / group, N]
    bits: int
    group_size: int

    @classmethod
    def from_groups(cls, groups: AffineGroups) -> "AntiquantWeight":
        """From ``w = scale * code + bias`` (over ``[N, K]``) to the kernel's ``(code + offset) * scale``
        (over ``[K, N]``): ``offset = bias / scale``. A group whose scale is 0 holds ``bias`` everywhere;
        it becomes codes 0, scale ``bias``, offset 1."""
        codes, scale, bias = groups.codes, groups.scale, groups.bias
        if codes.dim() != 2:
            raise ValueError(f"expected a matrix [N, K], got codes of shape {tuple(codes.shape)}")
        offset = None
        if bias is not None:
            dead = scale == 0
            if bool(dead.any()):
                g = groups.group_size
                codes = codes.masked_fill(dead.repeat_interleave(g, dim=1), 0)
                scale = torch.where(dead, bias, scale)
            offset = torch.where(dead, torch.ones_like(bias), bias / torch.where(dead, torch.ones_like(scale), scale))
        kn_codes = codes.t().contiguous()
        return cls(
            codes=kn_codes.to(torch.int32) if groups.bits == 4 else kn_codes,
            scale=scale.t().contiguous(),
            offset=None if offset is None else offset.t().contiguous(),
            bits=groups.bits,
            group_size=groups.group_size,
        )

    def dequantize(self) -> torch.Tensor:
        """Float32 ``[N, K]``: the documented antiquant formula in torch."""
        g = self.group_size
        w = self.codes.float()
        if self.offset is not None:
            w = w + self.offset.repeat_interleave(g, dim=0)
        return (w * self.scale.repeat_interleave(g, dim=0)).t()


class AscendKernels:
    """The torch_npu calls."""

    @staticmethod
    def pack_int4(codes_kn: torch.Tensor) -> torch.Tensor:
        return torch_npu().npu_convert_weight_to_int4pack(codes_kn)

    @staticmethod
    def matmul(x, weight, scale, offset, group_size: int) -> torch.Tensor:
        return torch_npu().npu_weight_quant_batchmatmul(x, weight, scale, offset, antiquant_group_size=group_size)


class ReferenceKernels:
    """``AscendKernels``' contract in plain torch (int4 kept unpacked): the reference the device tests
    compare against, and what the CPU tests run the ops' loading and forward plumbing with."""

    @staticmethod
    def pack_int4(codes_kn: torch.Tensor) -> torch.Tensor:
        return codes_kn

    @staticmethod
    def matmul(x, weight, scale, offset, group_size: int) -> torch.Tensor:
        w = weight.float()
        if offset is not None:
            w = w + offset.float().repeat_interleave(group_size, dim=0)
        w = w * scale.float().repeat_interleave(group_size, dim=0)
        return (x.float() @ w).to(x.dtype)


def kernels_for(device: torch.device | str):
    """The kernels that run on ``device`` (only NPUs have the vendor ones)."""
    from ._env import device_type

    if device_type(device) != "npu":
        raise RuntimeError(f"npu_weight_quant_batchmatmul runs on npu devices, not {device}")
    return AscendKernels


class NPUQuantMatrix:
    """A ``[N, K]`` GGUF weight on ``device``: weight-quantized when its type allows, else dense.

    ``matmul(x[M, K]) -> [M, N]`` in ``compute_dtype`` (float16 or bfloat16: the kernel takes scales in
    the activation dtype)."""

    def __init__(self, qt: "QuantizedTensor", device, compute_dtype: torch.dtype, kernels=None):
        self.name = qt.name
        self.shape = tuple(int(s) for s in qt.shape)
        if len(self.shape) != 2:
            raise ValueError(f"{qt.name}: expected a matrix [out, in], got shape {self.shape}")
        self.compute_dtype = compute_dtype
        self.kernels = kernels or kernels_for(device)
        n, k = self.shape
        self.quantized = qt.ggml_type in AFFINE_TYPES and k % MIN_GROUP == 0 and k > MIN_GROUP
        if self.quantized and qt.ggml_type in INT4_TYPES and n % 8:
            self.quantized = False  # int4 packs 8 output columns per int32
        if self.quantized:
            aq = AntiquantWeight.from_groups(affine_groups(qt.data, qt.ggml_type, self.shape, qt.name))
            codes = aq.codes.to(device)
            self.weight = self.kernels.pack_int4(codes) if aq.bits == 4 else codes
            self.scale = aq.scale.to(device=device, dtype=compute_dtype)
            self.offset = None if aq.offset is None else aq.offset.to(device=device, dtype=compute_dtype)
            self.group_size = aq.group_size
        else:
            self.weight = qt.dequantize(dtype=compute_dtype, device=device)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        if self.quantized:
            return self.kernels.matmul(x, self.weight, self.scale, self.offset, self.group_size)
        return torch.nn.functional.linear(x, self.weight)
