"""The ``ktcore`` entry point of kt-xpu: its ops and its rule files."""

from __future__ import annotations

from pathlib import Path

from ktcore.hookspecs import hookimpl

from .attention import KAttentionXPU
from .experts import KExpertsXPU
from .linear import KLinearXPU

RULE_DIR = Path(__file__).parent / "rule_files"


@hookimpl
def register_linear_ops(register):
    register(KLinearXPU)


@hookimpl
def register_experts_ops(register):
    register(KExpertsXPU)


@hookimpl
def register_attention_ops(register):
    register(KAttentionXPU)


@hookimpl
def register_rule_dirs(register):
    register(RULE_DIR)
