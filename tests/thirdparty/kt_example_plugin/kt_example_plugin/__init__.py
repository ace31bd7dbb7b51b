"""An example third-party backend: registers the linear op ``KLinearExample``."""

import torch
import torch.nn.functional as F

import ktcore


class KLinearExample(ktcore.Op):
    """``x @ W.T + b`` with the weights dequantized to fp32 at load time; counts its calls so a caller
    can prove the op ran."""

    name = "KLinearExample"
    role = "linear"
    devices = ("cpu",)
    calls = 0

    def load(self, weights):
        self.weight = weights["weight"].dequantize(torch.float32, self.device)
        bias = weights.get("bias")
        self.bias = bias.dequantize(torch.float32, self.device) if bias is not None else None

    def forward(self, x):
        KLinearExample.calls += 1
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@ktcore.hookimpl
def register_linear_ops(register):
    register(KLinearExample)
