"""Hybrid CPU/GPU execution: the MoE block wrapper ``KMoE`` and the model-level ``transfer_map``.

``KMoE`` replaces a sparse MoE block (``DeepseekV2Moe``, ``DeepseekV3MoE``, ``Qwen2MoeSparseMoeBlock``,
``Qwen3MoeSparseMoeBlock``, ``MixtralSparseMoeBlock``, ...: a module with a ``gate`` router and an
``experts`` child). Its forward runs the router where the block lives, submits the routed experts (a
``KExperts`` wrapper, typically on the CPU) asynchronously, runs the shared experts meanwhile (on the GPU),
then syncs and adds: the same arithmetic as the block's own forward, in an order that overlaps the two. Its
rule options place experts elsewhere (hot experts on the GPU, routed experts streamed to the GPU for long
prompts) and trade quality for speed (selective experts, expert deferral): see ``KMoE``.

``transfer_map`` (``{layer_index: device}``; a rule file entry ``- transfer_map: {30: "cuda:1"}`` or
``load_model(..., transfer_map=...)``) puts decoder layers ``i`` onward on the given device: inside those
layers every non-CPU device the rules name becomes that device (what the rules put on the CPU, such as
routed experts, stays there), and forward pre-hooks move the hidden states (and every other tensor
argument) to a layer's device as it is entered, and back to the final norm's device after the last layer.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .builtin.experts import select_experts
from .modules import KExperts, KModule, module_role


EXPERT_SPLIT_OPTIONS = ("gpu_op", "gpu_device", "gpu_op_kwargs", "hot_experts", "gpu_prefill_threshold", "defer",
                        "top_k")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
AUTO = "auto"  # gpu_prefill_threshold decided at load by what memory the devices have free


class KMoE(KModule):
    """A sparse MoE block whose routed experts overlap its shared experts.

    ``forward(hidden_states[..., H]) -> [..., H]``: router on the block's device -> ``experts.submit`` ->
    shared experts (``shared_experts``, or ``shared_expert`` gated by ``sigmoid(shared_expert_gate(x))``)
    -> ``experts.sync()`` -> routed + shared.

    Rule options (all off by default, and then the block computes exactly what it did without them):

    - ``overlap`` (default true): false runs the routed experts to completion before the shared ones.
    - ``hot_experts``: experts kept on ``gpu_device`` besides the routed experts' own placement: a list of
      expert ids, ``all``, or ``{layer index: list | all}`` (one rule for every layer). Their (token, slot)
      pairs go to a ``gpu_op`` holding only them, the others to the ``experts`` child (typically
      ``KExpertsCPU``), both at once; the outputs are summed.
    - ``gpu_prefill_threshold``: calls of more tokens than this stream the layer's routed experts (raw GGUF
      blocks, kept in pinned host memory) to ``gpu_device`` and compute them there with ``gpu_op``; the copy
      of the next such block starts on a side stream meanwhile. Measure it: ``bench/bench_hybrid.py
      --find-threshold``. ``auto`` (the shipped gpu-cpu files): ``ktcore.placement.GPU_PREFILL_THRESHOLD``
      when the pinned copies and the GPU's streaming buffers fit in what the devices have free at load
      (``ktcore.placement.resolve_auto_streaming``), else off.
    - ``gpu_op`` (default ``KExpertsGPU``), ``gpu_device`` (default ``cuda``), ``gpu_op_kwargs``: the op
      that computes hot and streamed experts, where, and its options.
    - ``top_k``: selective experts: only the ``top_k`` highest-weight of the router's choices run (weights
      kept as the router gave them).
    - ``defer``: the ``defer`` lowest-weight choices of each token (among those that run) are submitted to
      the experts child after the others finished, and their output is added to the next MoE block's
      output instead of this one's, so they run on the CPU while the next layer's attention runs on the
      GPU (KTransformers' expert deferral). The last MoE block of the model never defers.
    """

    role = "moe"
    uses_ops = False
    rule_options = ("overlap", *EXPERT_SPLIT_OPTIONS)

    def __init__(self, original: nn.Module, *, overlap: bool = True, gpu_op: str = "KExpertsGPU",
                 gpu_device: str | torch.device = "cuda", gpu_op_kwargs: Mapping | None = None,
                 hot_experts: Any = None, gpu_prefill_threshold: int | None = None, defer: int = 0,
                 top_k: int | None = None, name: str = "", build: bool = True):
        nn.Module.__init__(self)
        self._adopt(original, name)
        if not self.accepts(original):
            raise ValueError(f"KMoE {name}: {type(original).__name__} has no 'gate' and 'experts' children; "
                             "KMoE replaces sparse MoE blocks")
        given = dict(overlap=overlap, gpu_op=gpu_op, gpu_device=gpu_device, gpu_op_kwargs=gpu_op_kwargs,
                     hot_experts=hot_experts, gpu_prefill_threshold=gpu_prefill_threshold, defer=defer, top_k=top_k)
        for key, value in given.items():
            problem = self.check_option(key, value)
            if problem:
                raise ValueError(f"KMoE {name}: {problem}")
        self.overlap = overlap
        self.prefill_op = self.generate_op = None
        self.layer_index = layer_index(name)
        self.num_experts = int(getattr(experts_module(original.experts), "num_experts", 0))
        self.hot = resolve_hot_experts(hot_experts, self.layer_index, self.num_experts, name)
        self.gpu_op_name = gpu_op
        self.gpu_device = torch.device(gpu_device)
        self.gpu_op_kwargs = dict(gpu_op_kwargs or {})
        self.gpu_prefill_threshold = gpu_prefill_threshold
        self.defer = defer
        self.top_k = top_k
        self.gpu_op_cls = None  # resolved in build_ops when hot or streamed experts need it
        self.hot_op = None
        self._hot_maps: dict[torch.device, torch.Tensor] = {}  # expert id -> index in hot_op, or -1
        self._host = None  # streamed experts: (host bytes of the three projections, [(tensor, start, end)])
        self._inflight = None  # a started copy of them: (bytes on gpu_device, event or None)
        self._chain: MoEChain | None = None  # the model's MoE blocks in order (link_moe_blocks)

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return module_role(module) == "moe"

    @classmethod
    def check_option(cls, key: str, value: Any) -> str | None:
        if key == "overlap" and not isinstance(value, bool):
            return f"overlap must be true or false, got {value!r}"
        if key == "gpu_op" and not isinstance(value, str):
            return f"gpu_op must be an experts op name such as KExpertsGPU, got {value!r}"
        if key == "gpu_device":
            try:
                torch.device(value)
            except (RuntimeError, TypeError):
                return f"gpu_device must be a torch device such as cuda:0, got {value!r}"
        if key == "gpu_op_kwargs" and value is not None and not isinstance(value, Mapping):
            return f"gpu_op_kwargs must be a mapping, got {value!r}"
        if key == "hot_experts":
            return hot_experts_problem(value)
        if key == "gpu_prefill_threshold" and value == AUTO:
            return None
        if key in ("gpu_prefill_threshold", "top_k") and value is not None and not _positive_int(value):
            return f"{key} must be an integer >= 1, got {value!r}"
        if key == "defer" and not (_positive_int(value) or value == 0 and not isinstance(value, bool)):
            return f"defer must be an integer >= 0, got {value!r}"
        return None

    def build_ops(self) -> None:
        """The op for hot and streamed experts (the block's other children run themselves)."""
        from .registry import device_missing_reason, get_registry

        if self.gpu_prefill_threshold == AUTO and device_missing_reason(self.gpu_device):
            self.gpu_prefill_threshold = None  # nothing to stream to
        if not (self.hot or self.gpu_prefill_threshold):
            return

        self.gpu_op_cls = get_registry().resolve("experts", self.gpu_op_name, self.gpu_device)
        if self.hot:
            self.hot_op = self.gpu_op_cls(expert_subset(self.experts, len(self.hot)), self.gpu_device,
                                          **self.gpu_op_kwargs)

    def ops(self) -> list:
        return [self.hot_op] if self.hot_op is not None else []

    def weight_names(self) -> list[str]:
        """The routed experts' tensors, when hot or streamed experts need them (the experts child loads
        them too, for what it computes)."""
        return [f"experts.{p}" for p in PROJECTIONS] if (self.hot or self.gpu_prefill_threshold) else []

    def load_weights(self, weights: Mapping[str, Any]) -> None:
        if self.hot_op is not None:
            self.hot_op.load({p: select_experts(weights[f"experts.{p}"], self.hot) for p in PROJECTIONS})
        if self.gpu_prefill_threshold:
            # one buffer, one copy per call; page-locked on CUDA (asynchronous copies need it)
            tensors = [weights[f"experts.{p}"] for p in PROJECTIONS]
            spans, start = [], 0
            for qt in tensors:
                spans.append((qt, start, start + qt.data.numel()))
                start += qt.data.numel()
            host = torch.empty(start, dtype=torch.uint8, pin_memory=self.gpu_device.type == "cuda")
            for qt, begin, end in spans:
                host[begin:end].copy_(qt.data.reshape(-1))
            self._host = (host, spans)

    def extra_repr(self) -> str:
        parts = [f"overlap={self.overlap}"]
        if self.hot:
            parts.append(f"hot_experts={len(self.hot)}@{self.gpu_device}")
        if self.gpu_prefill_threshold:
            parts.append(f"gpu_prefill_threshold={self.gpu_prefill_threshold}@{self.gpu_device}")
        parts += [f"{k}={getattr(self, k)}" for k in ("defer", "top_k") if getattr(self, k)]
        return ", ".join(parts)

    def shared_output(self, hidden_states: torch.Tensor, flat: torch.Tensor) -> torch.Tensor | None:
        """The shared experts' contribution (``None`` for blocks without shared experts), computed on the
        same tensors, in the same order, as the block's own forward."""
        modules = self._modules
        if modules.get("shared_experts") is not None:  # DeepSeek: applied to the unflattened input
            return modules["shared_experts"](hidden_states)
        if modules.get("shared_expert") is not None:  # Qwen2-MoE: a sigmoid-gated shared expert
            out = modules["shared_expert"](flat)
            gate = modules.get("shared_expert_gate")
            return out if gate is None else F.sigmoid(gate(flat)) * out
        return None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training:  # router jitter and auxiliary losses: the block's own training path
            return type(self.original).forward(self.original, hidden_states)
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        routing = self.gate(flat)
        if not (isinstance(routing, tuple) and len(routing) == 3):
            raise TypeError(f"KMoE {self.qualname}: the router {type(self.gate).__name__} returned "
                            f"{type(routing).__name__}, expected (logits, top_k_weights, top_k_index)")
        _, top_k_weights, top_k_index = routing
        chain = self._chain
        carried = chain.collect(self) if chain is not None else None  # the previous block's deferred experts
        later = None
        if self.gpu_prefill_threshold and flat.shape[0] > self.gpu_prefill_threshold:
            routed = self.streamed_experts(flat, top_k_index, top_k_weights)
            shared = self.shared_output(hidden_states, flat)
        else:
            if self.top_k or self.defer:
                top_k_index, top_k_weights, later = self.select(top_k_index, top_k_weights)
            routed, shared = self.routed_and_shared(hidden_states, flat, top_k_index, top_k_weights)
        routed = routed.to(hidden_states.device).reshape(shape)
        out = routed if shared is None else routed + shared.reshape(shape)
        if later is not None:
            chain.defer(self, flat, *later)
        if carried is not None:
            out = out + carried.to(out.device).reshape(shape)
        return out

    def routed_and_shared(self, hidden_states, flat, top_k_index, top_k_weights):
        """``(routed, shared)``: the routed experts (split between ``hot_op`` and the experts child when
        there are hot experts) overlapped with the shared experts."""
        experts = self.experts
        hot_index, cold_index = (None, top_k_index) if self.hot_op is None else self.split_index(top_k_index)

        def beside_routed():  # what runs while the routed experts compute (after them when not overlapped)
            hot = None if hot_index is None else self.hot_experts_output(flat, hot_index, top_k_weights)
            return hot, self.shared_output(hidden_states, flat)

        if not (self.overlap and isinstance(experts, KExperts)):
            routed = experts(flat, cold_index, top_k_weights)
            hot, shared = beside_routed()
        else:
            experts.submit(flat, cold_index, top_k_weights)
            try:
                hot, shared = beside_routed()
            finally:
                routed = experts.sync()  # also drains the experts when the others raised
        if hot is not None:
            routed = routed.to(flat.device) + hot.to(flat.device)
        return routed, shared

    # -- hot experts -------------------------------------------------------------------------------------

    def split_index(self, top_k_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hot, cold)``: the choices as indices into ``hot_op``'s experts (-1 where not hot), and as the
        experts child's indices with the hot ones replaced by -1 (an index both skip)."""
        device = top_k_index.device
        table = self._hot_maps.get(device)
        if table is None:
            table = torch.full((self.num_experts,), -1, dtype=torch.long)
            table[torch.tensor(self.hot, dtype=torch.long)] = torch.arange(len(self.hot))
            table = self._hot_maps[device] = table.to(device)
        hot = table[top_k_index.long()]
        cold = torch.where(hot >= 0, torch.full_like(top_k_index, -1), top_k_index)
        return hot, cold

    def hot_experts_output(self, flat, hot_index, top_k_weights) -> torch.Tensor:
        device = self.gpu_device
        return self.hot_op(flat.to(device), hot_index.to(device), top_k_weights.to(device))

    # -- selective experts and deferral ------------------------------------------------------------------

    def select(self, top_k_index, top_k_weights):
        """``(index, weights, later)``: the choices that run now, and ``(index, weights)`` of the deferred
        ones (``None`` when nothing is deferred). Choices are ranked by weight, highest first."""
        k = top_k_index.shape[-1]
        keep = min(self.top_k or k, k)
        defer = self.defer if self._chain is not None and not self._chain.is_last(self) else 0
        if self.defer and self._chain is None:
            raise RuntimeError(f"KMoE {self.qualname}: defer needs the model's MoE blocks linked "
                               "(ktcore.moe.link_moe_blocks(model); inject does it)")
        if defer >= keep:
            raise ValueError(f"KMoE {self.qualname}: defer={defer} leaves no expert to run now "
                             f"({keep} run per token)")
        if keep == k and not defer:
            return top_k_index, top_k_weights, None
        order = torch.argsort(top_k_weights, dim=-1, descending=True, stable=True)
        index, weights = top_k_index.gather(-1, order), top_k_weights.gather(-1, order)
        now = keep - defer
        later = (index[:, now:keep].contiguous(), weights[:, now:keep].contiguous()) if defer else None
        return index[:, :now].contiguous(), weights[:, :now].contiguous(), later

    # -- streamed experts (GPU prefill of experts that live on the CPU) -----------------------------------

    def start_copy(self) -> None:
        """Start copying this block's routed experts to ``gpu_device`` (on a side stream on CUDA)."""
        if self._inflight is not None:
            return
        if self._host is None:
            raise RuntimeError(f"KMoE {self.qualname}: gpu_prefill_threshold set but no weights loaded")
        device, host = self.gpu_device, self._host[0]
        if device.type == "cuda":
            stream = copy_stream(device)
            with torch.cuda.stream(stream):
                data = host.to(device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
        else:
            data, event = host.to(device), None
        self._inflight = (data, event)

    def take_copy(self) -> dict:
        """This block's routed experts on ``gpu_device`` as QuantizedTensors (the copy waited for on the
        current stream)."""
        from .weights.tensor import QuantizedTensor

        if self._inflight is None:
            self.start_copy()
        data, event = self._inflight
        self._inflight = None
        if event is not None:
            stream = torch.cuda.current_stream(self.gpu_device)
            stream.wait_event(event)
            data.record_stream(stream)  # allocated on the side stream, freed after this one used it
        return {p: QuantizedTensor(qt.name, qt.ggml_type, tuple(qt.shape), data[begin:end], qt.source, qt.scale)
                for p, (qt, begin, end) in zip(PROJECTIONS, self._host[1])}

    def streamed_experts(self, flat, top_k_index, top_k_weights) -> torch.Tensor:
        """All routed experts of this block on ``gpu_device``: this block's copy is taken, the next
        streaming block's copy started, and a fresh ``gpu_op`` computes (its weights freed afterwards)."""
        weights = self.take_copy()
        following = self._chain.next_streaming(self, flat.shape[0]) if self._chain is not None else None
        if following is not None:
            following.start_copy()
        op = self.gpu_op_cls(expert_subset(self.experts, self.num_experts), self.gpu_device, **self.gpu_op_kwargs)
        op.load(weights)
        device = self.gpu_device
        return op(flat.to(device), top_k_index.to(device), top_k_weights.to(device))


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def layer_index(qualname: str) -> int | None:
    """The decoder layer index in a qualified name (``model.layers.3.mlp`` -> 3), if any."""
    found = re.findall(r"\.(\d+)(?=\.|$)", qualname)
    return int(found[-1]) if found else None


def hot_experts_problem(value: Any) -> str | None:
    """Why a ``hot_experts`` option is malformed (``None``: fine)."""
    def ids_problem(ids: Any) -> str | None:
        if ids == "all":
            return None
        if not isinstance(ids, (list, tuple)) or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0
                                                          for e in ids):
            return f"a list of expert ids (integers >= 0) or 'all', got {ids!r}"
        if len(set(ids)) != len(ids):
            return f"expert ids given twice in {list(ids)}"
        return None

    if value is None:
        return None
    if isinstance(value, Mapping):
        for layer, ids in value.items():
            if not (isinstance(layer, int) or isinstance(layer, str) and layer.isdigit()):
                return f"hot_experts: layer {layer!r} is not an integer >= 0"
            problem = ids_problem(ids)
            if problem:
                return f"hot_experts of layer {layer}: {problem}"
        return None
    problem = ids_problem(value)
    return f"hot_experts must be {problem.removeprefix('a ')}, or {{layer index: that}}" if problem else None


def resolve_hot_experts(value: Any, layer: int | None, num_experts: int, name: str) -> list[int]:
    """The sorted hot expert ids of the block at ``layer`` (``[]``: none)."""
    if isinstance(value, Mapping):
        value = {int(k): v for k, v in value.items()}.get(layer)
    if value is None:
        return []
    ids = list(range(num_experts)) if value == "all" else sorted(int(e) for e in value)
    bad = [e for e in ids if e >= num_experts]
    if bad:
        raise ValueError(f"KMoE {name}: hot_experts {bad} outside 0..{num_experts - 1}")
    return ids


def experts_module(experts: nn.Module) -> nn.Module:
    """The Transformers experts module behind a ``KExperts`` wrapper (or the module itself)."""
    return experts.__dict__.get("original", experts)


def expert_subset(experts: nn.Module, count: int) -> nn.Module:
    """A shallow copy of the experts module that says it holds ``count`` experts (an op reads its shapes
    and activation from it, never its meta tensors)."""
    module = experts_module(experts)
    if count == getattr(module, "num_experts", None):
        return module
    subset = copy.copy(module)
    subset.__dict__["num_experts"] = count
    return subset


_COPY_STREAMS: dict[torch.device, Any] = {}


def copy_stream(device: torch.device):
    """The side stream streamed experts are copied on, one per CUDA device."""
    stream = _COPY_STREAMS.get(device)
    if stream is None:
        stream = _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return stream


class MoEChain:
    """A model's ``KMoE`` blocks in call order: what deferral and the streamed experts' prefetch need to
    know about the block that follows. ``deferred``: ``(block, experts wrapper)`` of a pending deferral."""

    def __init__(self, blocks: list[KMoE]):
        self.blocks = blocks
        self.position = {id(b): i for i, b in enumerate(blocks)}
        self.deferred = None

    def is_last(self, block: KMoE) -> bool:
        return self.position[id(block)] == len(self.blocks) - 1

    def next_streaming(self, block: KMoE, tokens: int) -> KMoE | None:
        """The next block, if it streams its experts for a call of ``tokens`` tokens."""
        i = self.position[id(block)] + 1
        if i < len(self.blocks):
            nxt = self.blocks[i]
            if nxt.gpu_prefill_threshold and tokens > nxt.gpu_prefill_threshold:
                return nxt
        return None

    def defer(self, block: KMoE, flat, index, weights) -> None:
        experts = block.experts
        if isinstance(experts, KExperts):
            experts.submit(flat, index, weights)
            self.deferred = (block, experts)
        else:
            self.deferred = (block, experts(flat, index, weights))

    def collect(self, block: KMoE) -> torch.Tensor | None:
        """The deferred output meant for ``block`` (the one after the deferring block), waited for; a
        deferral left over from an interrupted forward is drained and dropped."""
        pending, self.deferred = self.deferred, None
        if pending is None:
            return None
        owner, work = pending
        if isinstance(work, KExperts):
            if work._pending is None:  # dropped meanwhile (a CUDA graph capture that failed half-way)
                return None
            out = work.sync()
        else:
            out = work
        return out if self.position[id(owner)] + 1 == self.position[id(block)] else None


def link_moe_blocks(model: nn.Module) -> MoEChain | None:
    """Link the model's ``KMoE`` blocks in module order (inject calls this after building the ops)."""
    blocks = [m for m in model.modules() if isinstance(m, KMoE)]
    if not blocks:
        return None
    chain = MoEChain(blocks)
    for block in blocks:
        block._chain = chain
    return chain


# -- transfer_map -----------------------------------------------------------------------------------------


def parse_transfer_map(value: Any) -> tuple[dict[int, torch.device], list[str]]:
    """``{layer_index: device}`` from a rule file or a caller, and the problems found (one string each)."""
    if not isinstance(value, Mapping):
        return {}, [f"must be a mapping of layer index to device (e.g. {{30: 'cuda:1'}}), got {value!r}"]
    result, problems = {}, []
    for key, device in value.items():
        index = key if isinstance(key, int) and not isinstance(key, bool) else None
        if index is None and isinstance(key, str) and key.isdigit():
            index = int(key)
        if index is None or index < 0:
            problems.append(f"layer index {key!r} is not an integer >= 0")
            continue
        try:
            result[index] = torch.device(device)
        except (RuntimeError, TypeError):
            problems.append(f"layer {index}: {device!r} is not a torch device such as cuda:1")
    return result, problems


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ``ModuleList`` of a Transformers model's decoder layers."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            return name, module
    raise ValueError(f"{type(model).__name__} has no ModuleList named 'layers' (its decoder layers), "
                     "which a transfer_map needs")


class LayerDevices:
    """A transfer map resolved against one model: which device each decoder layer's modules move to."""

    def __init__(self, model: nn.Module, transfer_map: Mapping[int, torch.device | str]):
        self.prefix, layers = decoder_layers(model)
        self.num_layers = len(layers)
        bad = sorted(i for i in transfer_map if not 0 <= int(i) < self.num_layers)
        if bad:
            raise ValueError(f"transfer_map names layer(s) {bad}, but {type(model).__name__} has layers "
                             f"0..{self.num_layers - 1}")
        self.boundaries = sorted((int(i), torch.device(d)) for i, d in transfer_map.items())
        self._layer_re = re.compile(rf"^{re.escape(self.prefix)}\.(\d+)(?:\.|$)")

    def layer_device(self, index: int) -> torch.device | None:
        """The device of layer ``index`` (from the last boundary at or before it), ``None`` if before all."""
        device = None
        for start, target in self.boundaries:
            if start <= index:
                device = target
        return device

    def target(self, qualname: str) -> torch.device | None:
        """The device that the non-CPU modules under ``qualname`` move to (``None``: not inside a moved layer)."""
        match = self._layer_re.match(qualname)
        return self.layer_device(int(match.group(1))) if match else None

    @staticmethod
    def remap(device: torch.device | None, target: torch.device | None) -> torch.device | None:
        """``device`` as it is inside a layer moved to ``target``: every non-CPU device becomes the target."""
        if device is None or target is None or device.type == "cpu":
            return device
        return target

    def moved_layers(self) -> list[tuple[str, torch.device]]:
        """``(qualified name, device)`` of every layer from the first boundary on."""
        return [(f"{self.prefix}.{i}", self.layer_device(i)) for i in range(self.num_layers)
                if self.layer_device(i) is not None]


def _move_tensors(value: Any, device: torch.device) -> Any:
    """Every tensor inside ``value`` (nested tuples, lists, dicts) on ``device``; the pre-hooks call this
    once per call."""
    return _moved(value, device)


def _moved(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, tuple):
        moved = [_moved(v, device) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else tuple(moved)  # namedtuples too
    if isinstance(value, list):
        return [_moved(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    return value


def _module_device(module: nn.Module) -> torch.device | None:
    for tensor in (*module.parameters(), *module.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return None


class MoveInputs:
    """Forward pre-hook: every tensor argument of the call moves to ``device`` (``None``: to the device of
    the module's own first parameter, looked up per call, since hooks are placed before weights load).
    ``calls`` counts the calls it handled."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.calls = 0

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        self.calls += 1
        device = self.device or _module_device(module)
        if device is None:
            return None
        return _move_tensors((args, kwargs), device)


def install_transfer_hooks(model: nn.Module, layer_devices: LayerDevices) -> list[tuple[str, MoveInputs]]:
    """Pre-hooks on every moved decoder layer (each call's tensors go to its device; the decoder loop
    hands every layer the same position embeddings and mask, so each moved layer needs its own) and on
    the final norm after the layers (hidden states back to where it lives). Returns ``(name, hook)``."""
    modules = dict(model.named_modules())
    hooks = []
    for name, device in layer_devices.moved_layers():
        hooks.append((name, MoveInputs(device)))
    parent_name = layer_devices.prefix.rpartition(".")[0]
    parent = modules.get(parent_name)
    norm = getattr(parent, "norm", None) if parent is not None else None
    if isinstance(norm, nn.Module) and hooks:
        hooks.append((f"{parent_name}.norm" if parent_name else "norm", MoveInputs(None)))
    for name, hook in hooks:
        modules[name].register_forward_pre_hook(hook, with_kwargs=True)
    return hooks
