"""The ``ktcore`` entry point of kt-rocm: its backends of ``KLinearGPU`` and ``KExpertsGPU`` for AMD GPUs
(ROCm builds of torch use the ``cuda`` device type). Attention runs in ktcore's ``KAttentionSDPA``, which
ROCm torch computes with its own flash attention. GGUF dequantizers for GPU tensors come from kt-cuda,
whose Triton kernels register for the 'cuda' device type."""

from __future__ import annotations

from ktcore.hookspecs import hookimpl

from .ops import KExpertsROCm, KLinearROCm


@hookimpl
def register_linear_ops(register):
    register(KLinearROCm)


@hookimpl
def register_experts_ops(register):
    register(KExpertsROCm)
