"""ktcore's built-in plugin (registered as ``torch``): portable ops in plain PyTorch, so a bare
``pip install ktcore`` runs every supported family on any device torch has."""

from ..hookspecs import hookimpl
from .attention import KAttentionMLA, KAttentionSDPA
from .experts import KExpertsTorch
from .experts_gpt_oss import KExpertsGptOssTorch
from .linear import KLinearTorch
from .rope import KRoPETorch

__all__ = ["KAttentionMLA", "KAttentionSDPA", "KExpertsGptOssTorch", "KExpertsTorch", "KLinearTorch", "KRoPETorch"]


@hookimpl
def register_linear_ops(register):
    register(KLinearTorch)


@hookimpl
def register_experts_ops(register):
    register(KExpertsTorch)
    register(KExpertsGptOssTorch)


@hookimpl
def register_attention_ops(register):
    register(KAttentionSDPA)
    register(KAttentionMLA)


@hookimpl
def register_rope_ops(register):
    register(KRoPETorch)
