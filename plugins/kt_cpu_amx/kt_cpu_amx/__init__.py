"""kt-cpu-amx: ktcore's CPU backend.

C++ kernels (``kt_cpu_amx._kernels``, built with pybind11, no torch linkage) for quantized linear layers
(``KLinearCPU``) and fused MoE experts (``KExpertsCPU``): GGUF blocks repacked at load into 4-bit or 8-bit
groups, int8 activations, runtime dispatch AMX-BF16 (prefill) > AVX512-VNNI > AVX2, a persistent pinned
thread pool and asynchronous ``submit``/``sync`` for the experts.
"""

from .runtime import ISA_ORDER, get_runtime, select_isa, unavailable_reason

__all__ = ["ISA_ORDER", "get_runtime", "select_isa", "unavailable_reason"]
