"""The routed experts of one MoE layer split between experts kept on vLLM's device and a ktcore experts op on
the CPU. Nothing here imports vLLM: ``kt_vllm.method`` adapts it to vLLM's MoE method API, and the GPU host
(where vLLM is not installed) tests it directly.

``HybridExperts.run(x, topk_weights, topk_ids, gpu, beside)``: the CPU experts are submitted first (their
choices, with every GPU expert replaced by -1, an index every ktcore experts op skips), then ``beside()`` (the
shared experts) and ``gpu(x, slots, weights)`` (the GPU experts, with the router's choices as indices into the
GPU's own expert slots; a choice of a CPU expert becomes slot 0 with weight 0, which adds exactly nothing)
run while the CPU works, then the CPU output is waited for and added. On a CUDA device the CPU op is
enqueued on the current stream (``KExperts.stream_path``: kt-cpu-amx's host functions), so the whole call can
be captured into a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

import torch

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _renamed(message: str) -> str:
    """KMoE's message about its ``hot_experts``, in the words of this option."""
    return message.replace("KMoE ", "").replace("hot_experts", "gpu_experts")


def gpu_experts_problem(value: Any) -> str | None:
    """Why a ``gpu_experts`` option is malformed (``None``: fine). Its form is KMoE's ``hot_experts``: ``None``
    (no expert), ``"all"``, a list of expert ids, or ``{layer index: "all" | list}`` (layers not named: none)."""
    from ktcore.moe import hot_experts_problem

    problem = hot_experts_problem(value)
    return _renamed(problem) if problem else None


def gpu_expert_ids(value: Any, layer: int | None, num_experts: int, where: str) -> list[int]:
    """The sorted expert ids that layer ``layer`` keeps on the GPU (see ``gpu_experts_problem``)."""
    from ktcore.moe import resolve_hot_experts

    problem = gpu_experts_problem(value)
    if problem:
        raise ValueError(f"{where}: {problem}")
    try:
        return resolve_hot_experts(value, layer, num_experts, where)
    except ValueError as exc:
        raise ValueError(_renamed(str(exc))) from None


@cache
def _opened(path: str):
    """``(weight source, meta model)`` of a GGUF, once per process."""
    from ktcore.inject import build_meta_model
    from ktcore.weights import open_source

    source = open_source(path)
    return source, build_meta_model(source.config())


def cpu_experts(gguf: str, prefix: str, op: str, op_kwargs: Mapping[str, Any] | None = None,
                dims: tuple[int, int, int] | None = None):
    """A ``KExperts`` wrapper running ktcore experts op ``op`` (a name from ktcore's registry) on the CPU over
    the routed experts ``{prefix}.{gate,up,down}_proj`` of the GGUF ``gguf``, loaded. ``dims``: the
    ``(experts, hidden, intermediate)`` the caller computes with, checked against the GGUF's."""
    from ktcore.registry import get_registry
    from ktcore.sdk import KExperts

    source, meta = _opened(str(gguf))
    try:
        module = meta.get_submodule(prefix)
    except AttributeError:
        raise ValueError(f"{gguf}: the model it holds ({type(meta).__name__}) has no experts module {prefix!r}") from None
    found = tuple(getattr(module, a, None) for a in ("num_experts", "hidden_dim", "intermediate_dim"))
    if dims is not None and found != tuple(dims):
        raise ValueError(f"{gguf}: {prefix} holds (experts, hidden, intermediate) = {found}, but the served model "
                         f"has {tuple(dims)}: the GGUF is not the model vLLM serves")
    op_class = get_registry().resolve("experts", op, torch.device("cpu"))
    wrapper = KExperts(module, prefill_op=op_class, prefill_device="cpu", op_kwargs=dict(op_kwargs or {}),
                       name=prefix)
    wrapper.load_from(source, prefix)
    for instance in wrapper.ops():
        instance.post_load()
    return wrapper


class HybridExperts:
    """One MoE layer's routed experts: ``gpu_experts`` (global ids, ascending) computed by a caller-given GPU
    function over their slots ``0..len-1``, the rest by ``cpu`` (a loaded ``KExperts``, or ``None`` where this
    process computes no CPU part: TP ranks other than 0, or every expert on the GPU)."""

    def __init__(self, num_experts: int, gpu_experts: list[int], cpu=None, name: str = ""):
        bad = [e for e in gpu_experts if not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"{name}: GPU experts {bad} outside 0..{num_experts - 1}")
        self.num_experts = num_experts
        self.gpu_experts = sorted(gpu_experts)
        self.cpu = cpu
        self.name = name
        slots = torch.full((num_experts,), -1, dtype=torch.long)
        slots[torch.tensor(self.gpu_experts, dtype=torch.long)] = torch.arange(len(self.gpu_experts))
        self._slots = {torch.device("cpu"): slots}

    def slots(self, device: torch.device) -> torch.Tensor:
        """Global expert id -> GPU slot (-1: a CPU expert), on ``device``."""
        table = self._slots.get(device)
        if table is None:
            table = self._slots[device] = self._slots[torch.device("cpu")].to(device)
        return table

    def split(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """``(gpu slots, gpu weights, cpu ids)``: the GPU's choices as slots (a CPU expert's as slot 0 with
        weight 0) and the CPU's as global ids with every GPU expert replaced by -1."""
        slot = self.slots(topk_ids.device)[topk_ids.long()]
        on_gpu = slot >= 0
        gpu_slots = torch.where(on_gpu, slot, torch.zeros_like(slot)).to(topk_ids.dtype)
        gpu_weights = torch.where(on_gpu, topk_weights, torch.zeros_like(topk_weights))
        cpu_ids = torch.where(on_gpu, torch.full_like(topk_ids, -1), topk_ids)
        return gpu_slots, gpu_weights, cpu_ids

    def run(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
            gpu: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
            beside: Callable[[], None] | None = None) -> torch.Tensor:
        """The routed experts' output ``[T, H]`` in ``x``'s dtype (see the module docstring)."""
        if self.gpu_experts:
            gpu_slots, gpu_weights, cpu_ids = self.split(topk_ids, topk_weights)
        else:  # every expert on the CPU: nothing to split, per layer and step
            gpu_slots, gpu_weights, cpu_ids = None, None, topk_ids
        if self.cpu is not None:
            self.cpu.submit(x, cpu_ids, topk_weights)
        try:
            if beside is not None:
                beside()
            out = gpu(x, gpu_slots, gpu_weights) if gpu is not None and self.gpu_experts else None
        finally:
            cpu_out = self.cpu.sync() if self.cpu is not None else None  # drained also when the GPU part raised
        if cpu_out is None:
            return out if out is not None else torch.zeros_like(x)
        cpu_out = cpu_out.to(device=x.device, dtype=x.dtype)
        return cpu_out if out is None else out + cpu_out
