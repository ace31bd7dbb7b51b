"""ktcore backend for NVIDIA GPUs.

Ops (registered through the ``ktcore`` entry point ``cuda`` -> ``kt_cuda.plugin``):

- ``KLinearMarlin`` (linear): 4-bit weight-only GEMM written in Triton; GGUF Q4_0 / Q4_1 / Q4_K repack
  losslessly into its layout (group size 32, per-group scale and min).
- ``KExpertsGPU`` (experts): fused MoE experts, a Triton grouped GEMM over token-expert pairs sorted by
  expert, over the same int4 layout (or bf16 for other GGML types).
- ``KLinearFP8`` (linear): FP8 e4m3 GEMM with 128x128 weight block scales and per-token 1x128
  activation scales (DeepSeek-V3's scheme), in Triton.
- GGUF dequantizers that run on CUDA tensors, through ``register_dequantizers``.

Nothing here imports Triton or touches CUDA at import time: ``available()`` says why an op cannot run.
"""

__version__ = "0.1.0"
