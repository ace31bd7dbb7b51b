"""The ``ktcore`` entry point of kt-rocm: its ops and its rule files. (GGUF dequantizers for GPU tensors
come from kt-cuda, whose Triton kernels register for the 'cuda' device type, which ROCm shares.)"""

from __future__ import annotations

from pathlib import Path

from ktcore.hookspecs import hookimpl

from .ops import KAttentionROCm, KExpertsROCm, KLinearROCm

RULE_DIR = Path(__file__).parent / "rule_files"


@hookimpl
def register_linear_ops(register):
    register(KLinearROCm)


@hookimpl
def register_experts_ops(register):
    register(KExpertsROCm)


@hookimpl
def register_attention_ops(register):
    register(KAttentionROCm)


@hookimpl
def register_rule_dirs(register):
    register(RULE_DIR)
