"""``KLinearTorch``: an ``nn.Linear`` over weights dequantized once at load, on any torch device."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..ops import ANY_DEVICE, Op
from ._common import check_shape, module_dtype, parse_dtype


class KLinearTorch(Op):
    """``x @ weight.T + bias`` with ``torch.nn.functional.linear``.

    Options: ``dtype`` (compute and storage dtype of the dequantized weight; default: the dtype the model
    was built in). The output has the input's dtype.
    """

    name = "KLinearTorch"
    graph_capturable = True
    role = "linear"
    devices = ANY_DEVICE

    def __init__(self, module: torch.nn.Module, device="cpu", dtype=None, **kwargs):
        super().__init__(module, device, **kwargs)
        self.in_features = module.in_features
        self.out_features = module.out_features
        self.has_bias = module.bias is not None
        self.dtype = parse_dtype(dtype, self.name) or module_dtype(module)
        self.register_buffer("weight", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)

    def load(self, weights: Mapping[str, "QuantizedTensor"]) -> None:  # noqa: F821
        qt = weights["weight"]
        check_shape(self.name, qt, (self.out_features, self.in_features))
        self.weight = qt.dequantize(self.dtype, self.device)
        if self.has_bias:
            if "bias" not in weights:
                raise KeyError(f"{self.name}: the module has a bias but no 'bias' tensor was given next to '{qt.name}'")
            check_shape(self.name, weights["bias"], (self.out_features,))
            self.bias = weights["bias"].dequantize(self.dtype, self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError(f"{self.name}: forward before load()")
        return F.linear(x.to(self.dtype), self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, dtype={self.dtype}"
