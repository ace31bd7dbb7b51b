"""``KLinearMarlin``: a linear layer over 4-bit weights, multiplied without expanding them (Triton)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ktcore.sdk import Op

from .._env import cuda_unavailable_reason
from .. import int4
from ..ggml_blocks import INT4_TYPES
from ._common import DEFAULT_LAYOUT, check_shape, module_dtype, parse_dtype, parse_layout, parse_scales_dtype, tensor_label

HALF_DTYPES = (torch.float16, torch.bfloat16)


class KLinearMarlin(Op):
    """``x @ W.T + b`` with ``W`` kept as int4 groups on the GPU (the Marlin idea, written in Triton).

    GGUF Q4_0, Q4_1 and Q4_K weights repack losslessly (group size 32, a scale and a min per group).
    Weights of other GGML types are, by default, dequantized once and multiplied with torch
    (``requantize: true`` instead rounds them to int4 with ``group_size`` 32, 64 or 128, asymmetric).

    Options: ``dtype`` (storage of dequantized weights and bias, and what they compute in; default the
    model's dtype where it is float16 or bfloat16, else bfloat16, as the int4 kernels compute: a float32
    model, which is what a GGUF file gives, would otherwise read 4 bytes per weight every step),
    ``scales_dtype`` (``auto``: float16 where lossless, else float32; ``float16`` trades Q4_K's exactness
    for 1/6 fewer bytes), ``requantize``, ``group_size``, ``layout`` (``n_major`` or ``k_major``: how the
    packed bytes are stored; up to 16 rows, ``n_major`` bytes run the int32-word kernels, measured
    1.4-1.7x fp16 at batch 1 on an H200, ``k_major`` ones only the slower byte kernels), ``activations``
    (``float``, default: the input's half dtype; ``int8``: up to 4 rows are rounded to int8 per block of 32
    first, as llama.cpp's CUDA GEMV does, and multiplied with ``dp4a``: faster at 1-4 rows, not exact).
    Kernel and tile are timed once per batch size and shape (autotuned).
    The output has the input's dtype.
    """

    name = "KLinearGPU"  # KTransformers' spelling KLinearMarlin is declared by ktcore
    graph_capturable = True
    role = "linear"
    devices = ("cuda",)
    ggml_types = None  # Q4_0/Q4_1/Q4_K are consumed as they are; any other type is dequantized
    repacked_types = INT4_TYPES

    def __init__(self, module: torch.nn.Module, device="cuda", dtype=None, scales_dtype="auto",
                 requantize: bool = False, group_size: int = 32, layout: str = DEFAULT_LAYOUT,
                 activations: str = "float", **kwargs):
        super().__init__(module, device, **kwargs)
        self.in_features = module.in_features
        self.out_features = module.out_features
        self.has_bias = module.bias is not None
        model_dtype = module_dtype(module)
        self.dtype = parse_dtype(dtype, self.name) or (model_dtype if model_dtype in HALF_DTYPES else torch.bfloat16)
        self.scales_dtype = parse_scales_dtype(scales_dtype, self.name)
        self.requantize = bool(requantize)
        if group_size not in int4.GROUP_SIZES:
            raise ValueError(f"{self.name}: group_size must be one of {int4.GROUP_SIZES}, got {group_size}")
        self.group_size = group_size
        self.k_major = parse_layout(layout, self.name)
        if activations not in ("float", "int8"):
            raise ValueError(f"{self.name}: activations must be 'float' or 'int8', got {activations!r}")
        self.act_int8 = activations == "int8"
        self.weight_int4: int4.Int4Weight | None = None
        self.register_buffer("weight", None, persistent=False)  # dense fallback
        self.register_buffer("bias", None, persistent=False)

    @classmethod
    def available(cls, device=None) -> str | None:
        return cuda_unavailable_reason(device)

    def load(self, weights: Mapping[str, "QuantizedTensor"]) -> None:  # noqa: F821
        if "weight" not in weights:
            raise KeyError(f"{self.name}: no 'weight' tensor given (got {sorted(weights)})")
        qt = weights["weight"]
        check_shape(self.name, qt, (self.out_features, self.in_features))
        if qt.ggml_type in INT4_TYPES:
            raw = qt.data.to(self.device)
            self.weight_int4 = int4.from_ggml(raw, qt.ggml_type, qt.shape, self.scales_dtype, name=tensor_label(qt))
            self.weight_int4 = int4.with_layout(self.weight_int4, self.k_major)
        elif self.requantize:
            if self.in_features % self.group_size:
                raise ValueError(f"{self.name}: {tensor_label(qt)} has {self.in_features} input features, "
                                 f"not a multiple of group_size {self.group_size}")
            dense = qt.dequantize(torch.float32, self.device)
            scales = torch.float16 if self.scales_dtype == "auto" else self.scales_dtype
            self.weight_int4 = int4.with_layout(int4.quantize(dense, self.group_size, scales_dtype=scales), self.k_major)
        else:
            self.weight = qt.dequantize(self.dtype, self.device)
        if self.has_bias:
            if "bias" not in weights:
                raise KeyError(f"{self.name}: the module has a bias but no 'bias' tensor was given next to {tensor_label(qt)}")
            check_shape(self.name, weights["bias"], (self.out_features,))
            self.bias = weights["bias"].dequantize(torch.float32 if self.weight_int4 else self.dtype, self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_int4 is None and self.weight is None:
            raise RuntimeError(f"{self.name}: forward before load()")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.weight_int4 is None:
            y = F.linear(x2.to(self.dtype), self.weight, self.bias).to(x.dtype)
        else:
            from ..triton_int4 import int4_matmul

            compute = x2.dtype if x2.dtype in HALF_DTYPES else (self.dtype if self.dtype in HALF_DTYPES else torch.bfloat16)
            y = int4_matmul(x2.to(compute), self.weight_int4, self.bias, self.int4_config(x2.shape[0]),
                            act_int8=self.act_int8).to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def int4_config(self, rows: int):
        """Kernel and tile for ``rows`` activation rows; ``None`` autotunes per problem (NVIDIA). A vendor
        subclass that shares these kernels pins its own launch settings here."""
        return None

    def extra_repr(self) -> str:
        if self.weight_int4 is not None:
            w = self.weight_int4
            fmt = f"int4 g{w.group_size} scales={w.scales.dtype} {'asym' if w.mins is not None else 'sym'}"
            fmt += ", int8 activations" if self.act_int8 else ""
        else:
            fmt = f"dense {self.dtype}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, {fmt}"
