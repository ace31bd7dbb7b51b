"""vLLM's entry point (group ``vllm.general_plugins``, loaded in every vLLM process, TP workers included)."""

from __future__ import annotations


def register() -> None:
    """Check the vLLM version, then register the ``ktcore`` quantization config (importing it does)."""
    from . import check_vllm_version

    check_vllm_version()
    from . import config  # noqa: F401  (its class decorator registers "ktcore")
