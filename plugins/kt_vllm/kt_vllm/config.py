"""The ``ktcore`` quantization config of vLLM and its options.

Options come as the model's ``quantization_config`` (``--hf-overrides '{"quantization_config": {...}}'``,
or written into the model's config.json), with ``"quant_method": "ktcore"``:

- ``gguf`` (required): the GGUF file (first part of a split set, or a directory of them) holding the routed
  experts the CPU computes; read on TP rank 0 only, through ``ktcore.weights``.
- ``gpu_experts``: the experts kept on vLLM's device, whose weights vLLM loads from its checkpoint:
  ``null`` (none, the default), ``"all"``, a list of expert ids (every MoE layer), or ``{layer index: "all" |
  list}``. Every other routed expert runs on the CPU and its checkpoint tensors are skipped.
- ``cpu_op``: the ktcore experts op that computes them, by name from ktcore's registry (default
  ``KExpertsCPU``: kt-cpu-amx's kernels, else ktcore's torch fallback); ``kt plugins`` lists the ops.
- ``threads``: the CPU op's thread count (its ``threads`` option); ``cpu_op_kwargs``: any other op options.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import check_vllm_version

check_vllm_version()

from vllm.model_executor.layers.fused_moe import RoutedExperts  # noqa: E402
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod  # noqa: E402
from vllm.model_executor.layers.quantization import register_quantization_config  # noqa: E402
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig  # noqa: E402

NAME = "ktcore"
USAGE = ('--quantization ktcore needs its options as the model\'s quantization_config, e.g. --hf-overrides '
         '\'{"quantization_config": {"quant_method": "ktcore", "gguf": "/models/model.gguf", "gpu_experts": null}}\'')


@dataclass(frozen=True)
class Options:
    gguf: str
    gpu_experts: Any = None
    cpu_op: str = "KExpertsCPU"
    threads: int | None = None
    cpu_op_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, config: Mapping[str, Any]) -> Options:
        """Options from a ``quantization_config`` mapping; every problem is one ``ValueError`` naming the key."""
        from .hybrid import gpu_experts_problem

        known = {"quant_method", "gguf", "gpu_experts", "cpu_op", "threads", "cpu_op_kwargs"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"ktcore quantization_config: unknown option(s) {unknown}; known: {sorted(known)}")
        if config.get("quant_method", NAME) != NAME:
            raise ValueError(f"ktcore quantization_config: quant_method is {config['quant_method']!r}, not 'ktcore'")
        gguf = config.get("gguf")
        if not isinstance(gguf, str) or not gguf:
            raise ValueError(f"ktcore quantization_config: 'gguf' (the GGUF file's path) is required. {USAGE}")
        cpu_op = config.get("cpu_op", "KExpertsCPU")
        if not isinstance(cpu_op, str):
            raise ValueError(f"ktcore quantization_config: cpu_op must be an experts op name, got {cpu_op!r}")
        threads = config.get("threads")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ValueError(f"ktcore quantization_config: threads must be an integer >= 1, got {threads!r}")
        op_kwargs = config.get("cpu_op_kwargs") or {}
        if not isinstance(op_kwargs, Mapping):
            raise ValueError(f"ktcore quantization_config: cpu_op_kwargs must be a mapping, got {op_kwargs!r}")
        problem = gpu_experts_problem(config.get("gpu_experts"))
        if problem:
            raise ValueError(f"ktcore quantization_config: {problem}")
        return cls(gguf, config.get("gpu_experts"), cpu_op, threads, dict(op_kwargs))

    def op_kwargs(self) -> dict[str, Any]:
        """The CPU op's constructor options."""
        return {**self.cpu_op_kwargs, **({"threads": self.threads} if self.threads is not None else {})}


@register_quantization_config(NAME)
class KTCoreConfig(QuantizationConfig):
    """Linears unquantized (vLLM's own method); each MoE layer's routed experts through ``HybridMoEMethod``."""

    def __init__(self, options: Options | None = None):
        super().__init__()
        if options is None:
            raise ValueError(USAGE)
        self.options = options

    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KTCoreConfig:
        return cls(Options.parse(config))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            return UnquantizedLinearMethod()
        if isinstance(layer, RoutedExperts):
            from .method import HybridMoEMethod

            return HybridMoEMethod(layer.moe_config, self.options, prefix)
        return None
