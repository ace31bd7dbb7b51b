"""ktcore backend for AMD GPUs under a ROCm build of torch (``torch.version.hip``; device type ``cuda``).

Ops (entry point ``rocm`` -> ``kt_rocm.plugin``):

- ``KLinearROCm`` (linear): kt-cuda's Triton int4 GEMV/GEMM over GGUF Q4_0/Q4_1/Q4_K (repacked exactly),
  launched with HIP tile configs (``hip_configs``); other types dequantized.
- ``KExpertsROCm`` (experts): kt-cuda's Triton grouped MoE GEMM with HIP launch parameters.

The Triton kernels are kt-cuda's (pure Triton, no TMA/wgmma/Hopper-only code); this package adds the ROCm
availability checks and the wavefront-64 launch configurations.
"""

__version__ = "0.1.0"
