"""The ``ktcore`` entry point of kt-cuda: registers its ops, GPU dequantizers and rule files.

Importing this module needs neither CUDA nor Triton: the ops say why they cannot run (``available()``),
and the dequantizers are registered only where Triton can run them.
"""

from __future__ import annotations

from pathlib import Path

from ktcore.hookspecs import hookimpl

from ._env import cuda_unavailable_reason
from .ops import KExpertsGPU, KLinearFP8, KLinearMarlin
from .ops.attention import KAttentionFlashGQA, KMLAAttention

RULE_DIR = Path(__file__).parent / "rule_files"


@hookimpl
def register_linear_ops(register):
    register(KLinearMarlin)
    register(KLinearFP8)


@hookimpl
def register_experts_ops(register):
    register(KExpertsGPU)


@hookimpl
def register_attention_ops(register):
    register(KMLAAttention)
    register(KAttentionFlashGQA)


@hookimpl
def register_dequantizers(register):
    if cuda_unavailable_reason() is not None:
        return
    from .triton_dequant import DEQUANTIZERS

    for ggml_type, fn in DEQUANTIZERS.items():
        register(ggml_type, "cuda", fn)


@hookimpl
def register_rule_dirs(register):
    register(RULE_DIR)
