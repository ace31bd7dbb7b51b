"""ktcore's built-in plugin (registered as ``torch``): portable ops in plain PyTorch, so a bare
``pip install ktcore`` runs every supported family on any device torch has.

Besides its own ops it registers the fallback backend of the ops whose fast backends come from plugins
(``KLinearCPU``, ``KExpertsCPU``, ``KExpertsGptOssCPU``: kt-cpu-amx; ``KLinearGPU``, ``KExpertsGPU``: kt-cuda, kt-rocm, kt-xpu,
kt-ascend; ``KLinearFP8``: kt-cuda): the same torch code at the lowest preference, so a shipped rule file runs everywhere and
installing a backend makes it faster without editing it. KTransformers' spellings of those ops
(``KLinearMarlin``, ``KExpertsMarlin``) are declared here as well.
"""

from ..hookspecs import hookimpl
from .attention import KAttentionMLA, KAttentionSDPA
from .experts import KExpertsTorch
from .experts_fp8 import KExpertsFP8
from .experts_gpt_oss import KExpertsGptOssTorch
from .linear import KLinearTorch
from .rope import KRoPETorch

__all__ = ["KAttentionMLA", "KAttentionSDPA", "KExpertsFP8", "KExpertsGptOssTorch", "KExpertsTorch", "KLinearTorch", "KRoPETorch",
           "FALLBACK"]

FALLBACK = -100  # the preference of the torch code standing in for a plugin's backend


@hookimpl
def register_linear_ops(register):
    register(KLinearTorch)
    register(KLinearTorch, op="KLinearCPU", devices=("cpu",), preference=FALLBACK)
    register(KLinearTorch, op="KLinearGPU", preference=FALLBACK, aliases=("KLinearMarlin",))
    # kt-cuda's FP8 block GEMM; torch over the weights dequantized from FP8 elsewhere (deepseek_v3-fp8-gpu-cpu.yaml)
    register(KLinearTorch, op="KLinearFP8", preference=FALLBACK)


@hookimpl
def register_experts_ops(register):
    register(KExpertsTorch)
    register(KExpertsTorch, op="KExpertsCPU", devices=("cpu",), preference=FALLBACK)
    register(KExpertsTorch, op="KExpertsGPU", preference=FALLBACK, aliases=("KExpertsMarlin",))
    register(KExpertsFP8)  # native FP8 checkpoints' routed experts (keep: bf16 | fp8)
    register(KExpertsGptOssTorch)  # GPT-OSS's experts (biases, clamped SwiGLU)
    register(KExpertsGptOssTorch, op="KExpertsGptOssCPU", devices=("cpu",), preference=FALLBACK)  # kt-cpu-amx's


@hookimpl
def register_attention_ops(register):
    register(KAttentionSDPA)
    register(KAttentionMLA)


@hookimpl
def register_rope_ops(register):
    register(KRoPETorch)


@hookimpl
def register_weight_sources(register):
    from ..weights import builtin_source_classes

    for cls in builtin_source_classes():
        register(cls)
