"""The ``ktcore`` entry point of kt-cuda: its backends (NVIDIA, device type ``cuda``) and GPU dequantizers.

``KLinearGPU`` (int4 GEMM over Q4 GGUF blocks; KTransformers' ``KLinearMarlin``) and ``KExpertsGPU`` (fused
MoE) are the ops the shipped ``gpu-cpu``/``gpu`` layouts name. ``KAttentionFlashGQA`` and ``KMLAAttention``
are ops of their own (options of their own) and also the preferred CUDA backends of ``KAttentionSDPA`` and
``KAttentionMLA``. Importing this module needs neither CUDA nor Triton: the ops say why they cannot run
(``available()``), and the dequantizers are registered only where Triton can run them.
"""

from __future__ import annotations

from ktcore.hookspecs import hookimpl

from ._env import cuda_unavailable_reason
from .ops import KExpertsGPU, KLinearFP8, KLinearMarlin
from .ops.attention import KAttentionFlashGQA, KMLAAttention

TRITON_ATTENTION = 10  # preferred over ktcore's torch attention on CUDA
# kt-rocm's backends of the same ops also serve the 'cuda' device type (at preference 0); each refuses the
# other's torch build, and a file checked by device type alone gets NVIDIA's
NVIDIA_FIRST = 1


@hookimpl
def register_linear_ops(register):
    register(KLinearMarlin, preference=NVIDIA_FIRST)
    register(KLinearFP8)


@hookimpl
def register_experts_ops(register):
    register(KExpertsGPU, preference=NVIDIA_FIRST)


@hookimpl
def register_attention_ops(register):
    register(KMLAAttention)
    register(KMLAAttention, op="KAttentionMLA", preference=TRITON_ATTENTION)
    register(KAttentionFlashGQA)
    register(KAttentionFlashGQA, op="KAttentionSDPA", preference=TRITON_ATTENTION)


@hookimpl
def register_dequantizers(register):
    if cuda_unavailable_reason() is not None:
        return
    from .triton_dequant import DEQUANTIZERS

    for ggml_type, fn in DEQUANTIZERS.items():
        register(ggml_type, "cuda", fn)
