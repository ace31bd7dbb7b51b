"""``HybridMoEMethod``: vLLM's MoE method for one ``RoutedExperts`` layer under ``--quantization ktcore``.

The experts named by ``gpu_experts`` are a smaller expert set of vLLM's own ``UnquantizedFusedMoEMethod``
(its weights, kernels and TP sharding: vLLM loads those experts from its checkpoint into slots
``0..n-1``); the other experts' checkpoint tensors are skipped, and TP rank 0 computes them on the CPU with
a ktcore experts op over the GGUF (``kt_vllm.hybrid``). The CPU output is added on rank 0 only, before the
all-reduce vLLM's MoE runner does after the method (the output is reported unreduced), so the sum over ranks
is the whole layer. The shared experts run while the CPU works: the method says it overlaps them
(``mk_can_overlap_shared_experts``), so the runner leaves them to ``apply``.
"""

from __future__ import annotations

import copy

import torch

from . import check_vllm_version

check_vllm_version()

from vllm.config import get_current_vllm_config  # noqa: E402
from vllm.config.compilation import CUDAGraphMode  # noqa: E402
from vllm.logger import init_logger  # noqa: E402
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig  # noqa: E402
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase  # noqa: E402
from vllm.model_executor.layers.fused_moe.moe_output import UnfinalizedMoEOutput  # noqa: E402
from vllm.model_executor.layers.fused_moe.runner.shared_experts import SharedExpertsOrder  # noqa: E402
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (  # noqa: E402
    UnquantizedFusedMoEMethod,
)
from vllm.model_executor.utils import set_weight_attrs  # noqa: E402

from ktcore.moe import layer_index  # noqa: E402

from .hybrid import HybridExperts, cpu_experts, gpu_expert_ids  # noqa: E402

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger, so its handler prints it


class GPUExpertsView:
    """The ``RoutedExperts`` layer as the inner GPU method must see it in ``apply``: its parameters and
    attributes, but only the GPU experts (``global_num_experts``, no expert map)."""

    def __init__(self, layer: torch.nn.Module, num_experts: int):
        self.__dict__["_layer"] = layer
        self.__dict__["global_num_experts"] = self.__dict__["local_num_experts"] = num_experts
        self.__dict__["expert_map"] = None

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_layer"], name)


class HybridMoEMethod(FusedMoEMethodBase):
    def __init__(self, moe: FusedMoEConfig, options, prefix: str):
        super().__init__(moe)
        self.options = options
        self.prefix = prefix
        if moe.use_ep:
            raise NotImplementedError(f"{prefix}: --quantization ktcore does not support expert parallelism "
                                      "(drop --enable-expert-parallel): the CPU experts are computed on TP rank 0")
        if moe.num_experts != moe.num_logical_experts:
            raise NotImplementedError(f"{prefix}: --quantization ktcore needs as many experts as the model routes "
                                      f"to ({moe.num_logical_experts}), got {moe.num_experts} (redundant or fused "
                                      "shared experts are not supported)")
        self.gpu_experts = gpu_expert_ids(options.gpu_experts, layer_index(prefix), moe.num_experts, prefix)
        self.inner = UnquantizedFusedMoEMethod(self._gpu_config()) if self.gpu_experts else None
        # TP rank 0 computes the CPU experts; its GGUF is opened now, so a wrong path fails before vLLM loads
        self.computes_cpu = moe.tp_rank == 0 and len(self.gpu_experts) < moe.num_experts
        if self.computes_cpu:
            from .hybrid import _opened

            _opened(options.gguf)
        self.hybrid: HybridExperts | None = None
        self._view: GPUExpertsView | None = None
        compilation = get_current_vllm_config().compilation_config
        graphs = compilation.cudagraph_mode not in (None, CUDAGraphMode.NONE)
        self.graph_tokens = (compilation.max_cudagraph_capture_size or 0) if graphs else 0

    def _gpu_config(self) -> FusedMoEConfig:
        """This layer's MoE config (after vLLM's size round-up) holding only the GPU experts."""
        config = copy.copy(self.moe)
        config.num_experts = config.num_local_experts = config.num_logical_experts = len(self.gpu_experts)
        return config

    @property
    def mk_can_overlap_shared_experts(self) -> bool:
        return True  # apply runs them, while the CPU experts compute

    def maybe_roundup_sizes(self, hidden_size, intermediate_size_per_partition, act_dtype, moe_parallel_config):
        method = self.inner if self.inner is not None else super()
        return method.maybe_roundup_sizes(hidden_size, intermediate_size_per_partition, act_dtype, moe_parallel_config)

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        gpu_count = len(self.gpu_experts)
        extra = dict(extra_weight_attrs, weight_loader=self._expert_loader(extra_weight_attrs["weight_loader"]),
                     global_num_experts=gpu_count)
        if self.inner is not None:
            self.inner.moe = self._gpu_config()
            self.inner.create_weights(layer, gpu_count, hidden_size, intermediate_size_per_partition, params_dtype,
                                      **extra)
            return
        # no GPU expert: empty parameters still receive (and skip) the checkpoint's expert tensors
        rows = intermediate_size_per_partition * (2 if self.moe.is_act_and_mul else 1)
        for name, shape in (("w13_weight", (0, rows, hidden_size)), ("w2_weight", (0, hidden_size,
                                                                                   intermediate_size_per_partition))):
            param = torch.nn.Parameter(torch.empty(shape, dtype=params_dtype), requires_grad=False)
            layer.register_parameter(name, param)
            set_weight_attrs(param, extra)

    def _expert_loader(self, load):
        """vLLM's expert weight loader for GPU experts, at their slot; a CPU expert's tensor is not taken."""
        slots = {e: slot for slot, e in enumerate(self.gpu_experts)}

        def weight_loader(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
            slot = slots.get(expert_id)
            if slot is None:  # computed on the CPU from the GGUF: never copied to vLLM's device
                return False if return_success else None
            return load(param, loaded_weight, weight_name, shard_id, slot, return_success)

        return weight_loader

    def get_fused_moe_quant_config(self, layer):
        return self.inner.get_fused_moe_quant_config(layer) if self.inner is not None else None

    def process_weights_after_loading(self, layer) -> None:
        if self.inner is not None:
            self.inner.process_weights_after_loading(layer)
            kernel = self.inner.moe_kernel
            if kernel is not None and kernel.output_is_reduced():
                raise NotImplementedError(f"{self.prefix}: vLLM's MoE kernel here reduces its output across ranks "
                                          "itself; --quantization ktcore adds the CPU experts before that reduction")
            self._view = GPUExpertsView(layer, len(self.gpu_experts))
        cpu = None
        if self.computes_cpu:
            moe = self.moe
            cpu = cpu_experts(self.options.gguf, self.prefix, self.options.cpu_op, self.options.op_kwargs(),
                              dims=(moe.num_experts, moe.hidden_dim_unpadded, moe.intermediate_size))
            self._check_graphs(cpu)
        self.hybrid = HybridExperts(self.moe.num_experts, self.gpu_experts, cpu, self.prefix)
        logger.info("ktcore: %s: %d of %d experts on %s (vLLM's %s, TP rank %d), the others %s", self.prefix,
                    len(self.gpu_experts), self.moe.num_experts, self.moe.device,
                    type(self.inner).__name__ if self.inner is not None else "none", self.moe.tp_rank,
                    f"on the CPU by {cpu.prefill_op_cls.__name__} ({cpu.prefill_op_cls.plugin})" if cpu is not None
                    else "on TP rank 0" if len(self.gpu_experts) < self.moe.num_experts else "none")

    def _check_graphs(self, cpu) -> None:
        """vLLM captures CUDA graphs of up to ``graph_tokens`` tokens: the CPU op must be able to run inside them
        (stream-ordered, ``ktcore.sdk.KExperts.stream_path``) for that many, else fail now with what to pass."""
        device = torch.device(self.moe.device)
        if device.type != "cuda" or not self.graph_tokens:
            return
        op = cpu.pick(self.graph_tokens)
        stream_problem = getattr(op, "stream_problem", None)
        problem = (stream_problem(device, self.graph_tokens) if callable(stream_problem)
                   else f"{type(op).__name__} has no stream-ordered path")
        if problem:
            raise ValueError(f"{self.prefix}: vLLM captures CUDA graphs of up to {self.graph_tokens} tokens, and the "
                             f"CPU experts cannot run inside them: {problem}. Pass --compilation-config "
                             "'{\"max_cudagraph_capture_size\": 16}' (kt-cpu-amx's KExpertsCPU takes up to 16 tokens "
                             "per captured call) or --enforce-eager")

    def _gpu_experts(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        index_dtype = self.inner.topk_indices_dtype
        out = self.inner.apply(self._view, x, weights, slots if index_dtype is None else slots.to(index_dtype),
                               None, None)
        if isinstance(out, UnfinalizedMoEOutput):
            raise NotImplementedError(f"{self.prefix}: deferred MoE finalization is not supported with ktcore")
        return out

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        if x.shape[-1] != self.moe.hidden_dim_unpadded:
            raise NotImplementedError(f"{self.prefix}: padded hidden states ({x.shape[-1]} for "
                                      f"{self.moe.hidden_dim_unpadded}) are not supported with ktcore")

        def beside():
            if shared_experts is not None:
                shared_experts(shared_experts_input, SharedExpertsOrder.MK_INTERNAL_OVERLAPPED)

        return self.hybrid.run(x, topk_weights, topk_ids, self._gpu_experts if self.inner is not None else None,
                               beside)
