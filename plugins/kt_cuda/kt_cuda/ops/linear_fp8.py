"""``KLinearFP8``: a linear layer over FP8 e4m3 weights with 128x128 block scales (DeepSeek-V3)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ktcore.sdk import Op

from .. import fp8
from .._env import cuda_unavailable_reason
from ._common import check_shape, parse_dtype, tensor_label

FP8_TYPES = ("F8_E4M3", "FP8_E4M3", "F8_E4M3FN")


class KLinearFP8(Op):
    """``x @ W.T + b`` in FP8: weights e4m3 in 128x128 blocks, activations quantized per 1x128 group.

    ``load()`` takes ``weight`` as FP8 e4m3 (ggml type name ``F8_E4M3``) with its block scales
    ``[ceil(N/128), ceil(K/128)]`` (DeepSeek-V3's checkpoints) as ``weight.scale`` (what ktcore's safetensors
    source gives) or as a ``weight_scale_inv`` tensor, or any other type, which is dequantized
    and quantized to FP8 blocks here. Needs ``in_features`` divisible by 128 and a GPU of compute
    capability 8.9 or newer. Options: ``dtype`` (of the bias and the output; default the input's).
    """

    name = "KLinearFP8"
    graph_capturable = True
    role = "linear"
    devices = ("cuda",)
    ggml_types = None

    def __init__(self, module: torch.nn.Module, device="cuda", dtype=None, **kwargs):
        super().__init__(module, device, **kwargs)
        self.in_features = module.in_features
        self.out_features = module.out_features
        if self.in_features % fp8.BLOCK:
            raise ValueError(f"{self.name}: in_features {self.in_features} is not a multiple of {fp8.BLOCK}")
        self.has_bias = module.bias is not None
        self.dtype = parse_dtype(dtype, self.name)
        self.register_buffer("weight", None, persistent=False)
        self.register_buffer("weight_scale", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)

    @classmethod
    def available(cls, device=None) -> str | None:
        return cuda_unavailable_reason(device, min_capability=(8, 9))

    def load(self, weights: Mapping[str, "QuantizedTensor"]) -> None:  # noqa: F821
        if "weight" not in weights:
            raise KeyError(f"{self.name}: no 'weight' tensor given (got {sorted(weights)})")
        qt = weights["weight"]
        N, K = self.out_features, self.in_features
        check_shape(self.name, qt, (N, K))
        if qt.ggml_type.upper() in FP8_TYPES:
            blocks = (-(-N // fp8.BLOCK), -(-K // fp8.BLOCK))
            if qt.scale is not None:  # a native FP8 checkpoint's weight carries its scales (ktcore.weights.fp8)
                if tuple(qt.scale.shape) != blocks:
                    raise ValueError(f"{self.name}: block scales of {tensor_label(qt)} have shape "
                                     f"{tuple(qt.scale.shape)}, expected {blocks}")
                self.weight_scale = qt.scale.to(self.device, torch.float32).contiguous()
            elif "weight_scale_inv" in weights:
                sqt = weights["weight_scale_inv"]
                check_shape(self.name, sqt, blocks)
                self.weight_scale = sqt.dequantize(torch.float32, self.device).contiguous()
            else:
                raise KeyError(f"{self.name}: FP8 weight {tensor_label(qt)} comes without 'weight_scale_inv'")
            self.weight = qt.data.to(self.device).view(fp8.FP8).view(N, K)
        else:
            self.weight, self.weight_scale = fp8.quantize_weight(qt.dequantize(torch.float32, self.device))
        if self.has_bias:
            if "bias" not in weights:
                raise KeyError(f"{self.name}: the module has a bias but no 'bias' tensor was given next to {tensor_label(qt)}")
            self.bias = weights["bias"].dequantize(torch.float32, self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError(f"{self.name}: forward before load()")
        from ..triton_fp8 import fp8_block_matmul

        lead = x.shape[:-1]
        y = fp8_block_matmul(x.reshape(-1, self.in_features), self.weight, self.weight_scale, self.bias,
                             out_dtype=self.dtype or x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, fp8 e4m3 128x128"
