"""ktcore backend for Intel GPUs (Arc, Data Center GPU Max/Flex) through ``torch.xpu`` (device type ``xpu``).

Ops (entry point ``xpu`` -> ``kt_xpu.plugin``):

- ``KLinearXPU`` (linear): torch's XPU int4 weight-only GEMM (``aten::_weight_int4pack_mm_with_scales_and_zeros``,
  the kernel intel-extension-for-pytorch upstreamed) over GGUF Q4_0/Q4_1/Q4_K repacked without
  requantizing; other types, or a torch without that kernel, run a dense matmul of the dequantized weight.
- ``KExpertsXPU`` (experts): routed MoE experts over the same matmuls, one expert at a time.

Nothing here touches an XPU at import time; ``available()`` says why an op cannot run.
"""

__version__ = "0.1.0"
