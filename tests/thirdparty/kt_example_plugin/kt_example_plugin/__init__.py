"""An example third-party backend: registers the linear op ``KLinearExample`` and the same class as a
backend of ktcore's role op ``KLinearCPU`` (below kt-cpu-amx's preference: taken only where a rule pins it
with ``backend: example``)."""

import torch
import torch.nn.functional as F

import ktcore
from ktcore.sdk import Op, check_shape


class KLinearExample(Op):
    """``x @ W.T + b`` with the weights dequantized to fp32 at load time; counts its calls so a caller
    can prove the op ran."""

    name = "KLinearExample"
    role = "linear"
    devices = ("cpu",)
    calls = 0

    def __init__(self, module, device="cpu", **kwargs):
        super().__init__(module, device, **kwargs)
        self.shape = (module.out_features, module.in_features)

    def load(self, weights):
        check_shape(self.name, weights["weight"], self.shape)
        self.weight = weights["weight"].dequantize(torch.float32, self.device)
        bias = weights.get("bias")
        self.bias = bias.dequantize(torch.float32, self.device) if bias is not None else None

    def forward(self, x):
        KLinearExample.calls += 1
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@ktcore.hookimpl
def register_linear_ops(register):
    register(KLinearExample)
    register(KLinearExample, op="KLinearCPU", preference=-10)
