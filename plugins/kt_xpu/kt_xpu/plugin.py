"""The ``ktcore`` entry point of kt-xpu: its backends of ``KLinearGPU`` and ``KExpertsGPU`` for Intel GPUs
(device type ``xpu``). Attention runs in ktcore's ``KAttentionSDPA``, which torch computes on the XPU."""

from __future__ import annotations

from ktcore.hookspecs import hookimpl

from .experts import KExpertsXPU
from .linear import KLinearXPU


@hookimpl
def register_linear_ops(register):
    register(KLinearXPU)


@hookimpl
def register_experts_ops(register):
    register(KExpertsXPU)
