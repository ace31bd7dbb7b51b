"""Where a model's weights go and whether they fit.

- ``estimate_memory(model, source)``: the bytes each device will hold once an injected (meta) model is loaded,
  from the tensors' GGML types and shapes (the source hands out views: no weight is read) and the ops the
  rules chose: ops that keep int4 (``repacked_types``, e.g. ``KLinearMarlin``, ``KExpertsGPU``) hold GGML int4
  at its own size and other types in bfloat16; ktcore's portable torch ops and plain parameters hold the model
  dtype; other plugins' ops (the CPU kernels) keep quantized blocks as they are and float weights as int8.
  ``KMoE`` adds its hot experts on its ``gpu_device`` and, for ``gpu_prefill_threshold``, the pinned host copy
  of the routed experts plus one layer's transient copy on the GPU (two raw layers in flight and one repacked).
- ``check_fit``: ``load_model`` calls it after injecting, before reading weights; it refuses a placement that
  does not fit in what each device has free, naming the device and by how much it is short.
- ``suggest_placement``: the planner behind ``kt rules suggest``: given VRAM and RAM budgets, a rule file that
  puts the dense part, shared experts and KV cache on the GPU, fills what VRAM is left with hot experts (by
  measured routing frequency) or, without a measurement, with whole layers' experts (llama.cpp's
  ``--n-cpu-moe``: the first layers' experts stay on the CPU), and streams CPU experts to the GPU for prefill
  when VRAM and RAM allow it.
- ``measure_routing``: how often each expert of each layer is routed to on a calibration prompt.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

GIB = 2**30
# left free on each device kind: CUDA context, activations, allocator slack; the OS and Python on the host
RESERVE = {"cuda": int(1.5 * GIB), "cpu": 2 * GIB}
# tokens per call above which CPU experts are streamed to the GPU for prefill (measure it on your machine:
# bench/bench_hybrid.py --find-threshold; kt rules suggest --prefill-threshold overrides it). 32: what
# --find-threshold printed on the H200 host (16 Xeon threads, 27-layer DeepSeek-V2-Lite shape, Q4_K experts):
# streaming ran at 0.85x the CPU experts' prefill speed at 32 tokens, 1.07x at 64, 3.16x at 512.
GPU_PREFILL_THRESHOLD = 32
INT4_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})


class PlacementError(ValueError):
    """A placement that cannot fit (raised before any weight is read)."""


def parse_size(text: str | int | float) -> int:
    """Bytes from ``24GiB``, ``24G``, ``200GB``, ``512MiB`` or a plain number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a size such as 24GiB, 512MiB or 200G")
    number, unit, suffix = match.groups()
    base = 1000 if suffix.lower() == "b" and unit else 1024
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


def gib(n: int | float) -> str:
    """Bytes as GiB (MiB below one GiB)."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:.1f} MiB"


@dataclass
class MemoryUsage:
    """Bytes per device, per component (``routed experts``, ``attention``, ...)."""

    parts: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))

    def add(self, device: torch.device | str, component: str, nbytes: int) -> None:
        self.parts[_device_key(device)][component] += int(nbytes)

    def total(self, device: str) -> int:
        return sum(self.parts.get(device, {}).values())

    def devices(self) -> list[str]:
        return sorted(self.parts, key=lambda d: (d == "cpu", d))

    def table(self, budgets: Mapping[str, int] | None = None) -> str:
        lines = []
        for device in sorted({*self.devices(), *(budgets or {})}, key=lambda d: (d == "cpu", d)):
            budget = (budgets or {}).get(device)
            head = f"{device}: {gib(self.total(device))}" + (f" of {gib(budget)}" if budget else "")
            lines.append(head)
            for component, nbytes in sorted(self.parts.get(device, {}).items(), key=lambda kv: -kv[1]):
                lines.append(f"  {component:<34} {gib(nbytes):>12}")
        return "\n".join(lines)


def _device_key(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return "cuda:0"
    return str(device)


def raw_bytes(qt) -> int:
    from .weights.quants import ggml_type

    numel = 1
    for n in qt.shape:
        numel *= int(n)
    return ggml_type(qt.ggml_type).nbytes(numel)


def _numel(qt) -> int:
    numel = 1
    for n in qt.shape:
        numel *= int(n)
    return numel


def weight_bytes(qt, op_cls: type | None, device: torch.device, dtype: torch.dtype, op_kwargs=None) -> int:
    """The bytes ``qt`` takes once loaded by ``op_cls`` (``None``: a plain parameter) on ``device``; an op
    class with ``estimated_bytes(qt, dtype, op_kwargs)`` (KExpertsFP8: what its ``keep`` option holds) says it."""
    numel = _numel(qt)
    own = getattr(op_cls, "estimated_bytes", None)
    if own is not None:
        return own(qt, dtype, op_kwargs or {})
    if op_cls is not None and getattr(op_cls, "repacked_types", None) is not None:
        return raw_bytes(qt) if qt.ggml_type in op_cls.repacked_types else numel * 2
    if op_cls is None or getattr(op_cls, "plugin", "") in ("torch", "") or device.type != "cpu":
        return numel * dtype.itemsize
    return numel if qt.ggml_type in FLOAT_TYPES else raw_bytes(qt)  # CPU kernels: blocks as they are


def _component(qualname: str, role: str) -> str:
    if role == "experts":
        return "routed experts"
    if qualname.endswith(".gate"):
        return "routers"
    if "shared_expert" in qualname:
        return "shared experts"
    if ".self_attn" in qualname or role == "attention":
        return "attention"
    if qualname.startswith("lm_head") or "embed" in qualname:
        return "embeddings, lm_head"
    if ".mlp." in qualname:
        return "dense MLPs"
    return "norms, routers, other"


def estimate_memory(model: nn.Module, source, dtype: torch.dtype | None = None,
                    default_device: torch.device | str | None = None, registry=None) -> MemoryUsage:
    """Bytes per device of an injected (meta) model once loaded (see the module docstring)."""
    from .inject import _AliasSource, _iter_modules, _placement, _tied_aliases
    from .modules import KModule
    from .moe import KMoE

    dtype = dtype or torch.float32
    default_device = torch.device(default_device or "cpu")
    placements = getattr(model, "_ktcore_placements", {})
    source = _AliasSource(source, _tied_aliases(model, source))  # tied weights read as loading reads them
    usage = MemoryUsage()
    counted: set[int] = set()
    stream_peak: dict[str, int] = {}
    for qualname, module in _iter_modules(model):
        if isinstance(module, KMoE):
            _estimate_kmoe(module, qualname, source, dtype, usage, stream_peak, registry)
        elif isinstance(module, KModule) and module.uses_ops:
            ops = [(module.prefill_op_cls, module.prefill_device)]
            if (module.generate_op_cls, module.generate_device) != ops[0]:
                ops.append((module.generate_op_cls, module.generate_device))
            for local in module.weight_names():
                try:
                    qt = source.get(f"{qualname}.{local}")
                except KeyError:
                    continue  # loading reports it, with the file's name
                for op_cls, device in ops:
                    usage.add(device, _component(qualname, module.role),
                              weight_bytes(qt, op_cls, device, dtype, module.op_kwargs))
        for local, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is None or id(tensor) in counted or local in module._non_persistent_buffers_set:
                continue
            counted.add(id(tensor))
            full = f"{qualname}.{local}" if qualname else local
            try:
                qt = source.get(full)
            except KeyError:
                continue  # tied or computed (lm_head tied to the embeddings, rotary tables)
            device = _placement(qualname, placements, default_device)
            usage.add(device, _component(qualname, ""), weight_bytes(qt, None, device, dtype))
    for device, nbytes in stream_peak.items():
        usage.add(device, "streaming buffers (one layer)", nbytes)
    return usage


def _estimate_kmoe(block, qualname: str, source, dtype, usage: MemoryUsage, stream_peak: dict, registry) -> None:
    from .moe import PROJECTIONS

    if not (block.hot or block.gpu_prefill_threshold):
        return
    op_cls = block.gpu_op_cls
    if op_cls is None:
        from .registry import get_registry

        op_cls = (registry or get_registry()).get("experts", block.gpu_op_name)
    device = block.gpu_device
    tensors = [source.get(f"{qualname}.experts.{p}") for p in PROJECTIONS]
    layer_gpu = sum(weight_bytes(qt, op_cls, device, dtype) for qt in tensors)
    layer_raw = sum(raw_bytes(qt) for qt in tensors)
    if block.hot:
        usage.add(device, "hot experts", layer_gpu * len(block.hot) // max(block.num_experts, 1))
    if block.gpu_prefill_threshold:
        if device.type == "cuda":
            usage.add("cpu", "streamed experts (pinned copy)", layer_raw)
        key = _device_key(device)
        stream_peak[key] = max(stream_peak.get(key, 0), 2 * layer_raw + layer_gpu)


def kv_cache_bytes(config, tokens: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the KV cache for ``tokens`` positions: MLA caches the latent and the rope key
    (``kv_lora_rank + qk_rope_head_dim`` per layer), others keys and values of every KV head."""
    config = getattr(config, "text_config", config)
    layers = config.num_hidden_layers
    if getattr(config, "kv_lora_rank", None):
        per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    else:
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_layer = 2 * heads * head_dim
    return tokens * layers * per_layer * dtype.itemsize


# -- the check at load time ------------------------------------------------------------------------------


def free_memory(device: str) -> int | None:
    """Bytes free on ``device`` now (``None``: unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        from .readahead import available_memory

        return available_memory()
    return None


def shortfalls(usage: MemoryUsage, available: Mapping[str, int | None]) -> list[str]:
    """One line per device whose estimate does not fit in ``available`` (less the reserve)."""
    lines = []
    for device in usage.devices():
        have = available.get(device)
        if have is None:
            continue
        need = usage.total(device) + RESERVE.get(torch.device(device).type, 0)
        if need > have:
            top = ", ".join(f"{c} {gib(n)}" for c, n in sorted(usage.parts[device].items(), key=lambda kv: -kv[1])[:3])
            lines.append(f"{device} needs {gib(need)} ({top}, reserve {gib(RESERVE.get(torch.device(device).type, 0))}) "
                         f"but has {gib(have)} free: short by {gib(need - have)}")
    return lines


def check_fit(model: nn.Module, source, dtype: torch.dtype | None = None, device=None,
              available: Mapping[str, int | None] | None = None, usage: MemoryUsage | None = None) -> MemoryUsage:
    """Raise ``PlacementError`` when the loaded model would not fit in the devices' free memory (``usage``:
    ``estimate_memory``'s answer when the caller has it already)."""
    usage = usage or estimate_memory(model, source, dtype, device)
    if available is None:
        available = {d: free_memory(d) for d in usage.devices()}
    short = shortfalls(usage, available)
    if short:
        raise PlacementError("this placement does not fit (nothing was loaded): " + "; ".join(short)
                             + ". Move weights off the short device in the rule file (`kt rules suggest` writes one "
                               "that fits), or pass check_memory=False to load anyway.")
    return usage


def resolve_auto_streaming(model: nn.Module, source, dtype: torch.dtype | None = None, device=None,
                           available: Mapping[str, int | None] | None = None
                           ) -> tuple[str | None, MemoryUsage | None]:
    """Decide ``gpu_prefill_threshold: auto`` for every KMoE block that asks for it: streamed GPU prefill at
    ``GPU_PREFILL_THRESHOLD`` when the whole placement, pinned copies and streaming buffers included, fits
    in what the devices have free and the pinned copies take at most half the free RAM (page-locked memory
    cannot be swapped or reclaimed); else off. Returns a line saying what was decided and the model's
    ``estimate_memory`` as decided (``(None, None)`` when no block asked)."""
    from .inject import _iter_modules
    from .moe import AUTO, KMoE

    blocks = [m for _, m in _iter_modules(model) if isinstance(m, KMoE) and m.gpu_prefill_threshold == AUTO]
    if not blocks:
        return None, None
    for block in blocks:
        block.gpu_prefill_threshold = None
    without = estimate_memory(model, source, dtype, device)
    for block in blocks:
        block.gpu_prefill_threshold = GPU_PREFILL_THRESHOLD
    usage = estimate_memory(model, source, dtype, device)
    if available is None:
        available = {d: free_memory(d) for d in usage.devices()}
    pinned = usage.total("cpu") - without.total("cpu")
    free_ram = available.get("cpu")
    short = shortfalls(usage, available)
    if free_ram is not None and 2 * pinned > free_ram:
        short.append(f"pinned copies {gib(pinned)} > half the free RAM ({gib(free_ram)})")
    if short:
        for block in blocks:
            block.gpu_prefill_threshold = None
        return f"streamed GPU prefill off (gpu_prefill_threshold: auto): {'; '.join(short)}", without
    return (f"streamed GPU prefill on above {GPU_PREFILL_THRESHOLD} tokens (gpu_prefill_threshold: auto): "
            f"{len(blocks)} MoE blocks, {gib(pinned)} pinned host copies"), usage


# -- routing frequency -----------------------------------------------------------------------------------


def measure_routing(model: nn.Module, input_ids: torch.Tensor) -> dict[int, list[int]]:
    """``{layer index: [tokens routed to expert e, ...]}`` over one forward of ``input_ids``."""
    from .modules import module_role
    from .moe import layer_index

    counts: dict[int, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if module_role(module) != "moe":
            continue
        layer = layer_index(name)
        experts = getattr(module, "experts", None)
        num = int(getattr(getattr(experts, "original", experts), "num_experts", 0) or 0)

        def hook(gate, args, out, layer=layer, num=num):
            index = out[2].reshape(-1).long().cpu()
            index = index[(index >= 0) & (index < num)]
            counts[layer] = counts.get(layer, torch.zeros(num, dtype=torch.long)) + torch.bincount(index, minlength=num)

        handles.append(module.gate.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return {layer: c.tolist() for layer, c in sorted(counts.items())}


# -- the planner -----------------------------------------------------------------------------------------


@dataclass
class Plan:
    rules_text: str
    usage: MemoryUsage
    budgets: dict[str, int]
    gpu_layers: list[int]  # layers whose routed experts all live on the GPU
    hot: dict[int, list[int]]  # layer -> hot experts (measured routing)
    streaming: bool
    notes: list[str]

    def summary(self) -> str:
        lines = [self.usage.table(self.budgets)]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def base_rule_file(model_type: str, registry=None) -> Path:
    """The shipped ``<model_type>-gpu-cpu.yaml`` to plan from (plugin directories first): the first one that
    can run here, else (the planner may run on another machine than the model) the first whose ops are all
    registered, checked by name only."""
    from .inject import rule_search_dirs
    from .registry import get_registry
    from .rules import RuleError, load_rules

    registry = registry or get_registry()
    tried = []
    for check_devices in (True, False):
        for directory in rule_search_dirs(registry):
            path = Path(directory) / f"{model_type}-gpu-cpu.yaml"
            if path.is_file():
                try:
                    load_rules(path, registry, check_devices=check_devices)
                    return path
                except RuleError as exc:
                    tried.append(f"{path}: {exc.issues[0]}")
    raise PlacementError(f"no usable {model_type}-gpu-cpu.yaml rule file to plan from ({'; '.join(tried) or 'none shipped'})")


def _layers_regex(layers: list[int]) -> str:
    return "(" + "|".join(str(i) for i in sorted(layers)) + ")"


def placement_rules(base_text: str, *, gpu_layers: list[int] = (), hot: Mapping[int, list[int]] | None = None,
                    prefill_threshold: int | None = None, gpu_op: str = "KExpertsGPU", header: str = "",
                    options: Mapping[str, Any] | None = None, device: str = "cuda") -> str:
    """A rule file: KMoE on every sparse block (with hot experts and streamed prefill on the CPU-expert
    layers, and any other KMoE ``options`` such as ``defer``/``top_k``), the routed experts of ``gpu_layers``
    on the GPU, then the base file's rules (its own KMoE rule left out). ``device``: the KMoE blocks' own
    placement (the router's device)."""
    import yaml

    rules = []
    if gpu_layers:
        rules.append({"match": {"name": rf"^model\.layers\.{_layers_regex(gpu_layers)}\.mlp\.experts$", "class": "experts"},
                      "replace": {"class": "KExperts", "device": "cuda",
                                  "kwargs": {"op": gpu_op, "prefill_device": "cuda", "generate_device": "cuda"}},
                      "recursive": False})
        rules.append({"match": {"name": rf"^model\.layers\.{_layers_regex(gpu_layers)}\.mlp$", "class": "moe"},
                      "replace": {"class": "KMoE", "device": device}, "optional": True})
    kwargs: dict[str, Any] = dict(options or {})
    if hot:
        kwargs["hot_experts"] = {int(layer): sorted(ids) for layer, ids in sorted(hot.items())}
    if prefill_threshold:
        kwargs["gpu_prefill_threshold"] = int(prefill_threshold)
    if hot or prefill_threshold:
        kwargs["gpu_op"] = gpu_op
    kmoe = {"match": {"name": r"^model\.layers\.\d+\.mlp$", "class": "moe"}, "replace": {"class": "KMoE", "device": device},
            "optional": True}
    if kwargs:
        kmoe["replace"]["kwargs"] = kwargs
    rules.append(kmoe)
    for entry in yaml.safe_load(base_text) or []:
        replace = entry.get("replace", {}) if isinstance(entry, dict) else {}
        if replace.get("class") == "KMoE":
            continue  # ours above takes every sparse block
        if isinstance(entry, dict) and entry.get("match", {}).get("class") == "experts":
            entry = {**entry, "optional": True}  # the GPU layers' rule may take every layer
        rules.append(entry)
    return header + yaml.safe_dump(rules, sort_keys=False, default_flow_style=None, width=120)


def rules_usage(source, rules_text: str, *, context: int = 0, dtype: torch.dtype = torch.float32,
                registry=None) -> MemoryUsage:
    """The estimated memory of ``source``'s model under a rule file's text (devices checked by name only),
    with the KV cache of ``context`` positions on the GPU."""
    import tempfile

    from .inject import build_meta_model, inject
    from .registry import get_registry
    from .rules import load_rules

    registry = registry or get_registry()
    config = source.config()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "placement-candidate.yaml"
        path.write_text(rules_text)
        model = build_meta_model(config, dtype)
        inject(model, load_rules(path, registry, check_devices=False), registry, build_ops=False)
    usage = estimate_memory(model, source, dtype, registry=registry)
    if context:
        usage.add("cuda:0", f"KV cache ({context} tokens)", kv_cache_bytes(config, context, dtype))
    return usage


def suggest_placement(path: str | Path, vram: int, ram: int, *, context: int = 4096, routing: Mapping | None = None,
                      prefill_threshold: int | None = GPU_PREFILL_THRESHOLD, dtype: torch.dtype = torch.float32,
                      rules: str | Path | None = None, registry=None, cpu_moe_layers: int | None = None) -> Plan:
    """A rule file that fits ``vram`` and ``ram`` bytes (see the module docstring). ``cpu_moe_layers``: the
    llama.cpp-style shortcut (its ``--n-cpu-moe``): the first N MoE layers' routed experts on the CPU, the
    others' on the GPU (a number >= the MoE layers: all on the CPU); refused when it does not fit."""
    from .registry import get_registry
    from .weights import open_source

    registry = registry or get_registry()
    source = open_source(str(path))
    config = source.config()
    base = Path(rules) if rules else base_rule_file(config.model_type, registry)
    base_text = base.read_text()
    budgets = {"cuda:0": vram, "cpu": ram}
    notes = [f"planned from {base}"]

    def usage_of(text: str) -> MemoryUsage:
        return rules_usage(source, text, context=context, dtype=dtype, registry=registry)

    def room(usage: MemoryUsage, device: str) -> int:
        return budgets[device] - RESERVE[torch.device(device).type] - usage.total(device)

    plain = usage_of(placement_rules(base_text, gpu_layers=[], hot={}, prefill_threshold=None))
    if room(plain, "cuda:0") < 0:
        raise PlacementError(f"the dense part alone does not fit the GPU: cuda:0 needs "
                             f"{gib(plain.total('cuda:0') + RESERVE['cuda'])} with a {context}-token KV cache, "
                             f"{gib(vram)} given (short by {gib(-room(plain, 'cuda:0'))}); lower --context or use "
                             "the cpu layout")
    if room(plain, "cpu") < 0:
        raise PlacementError(f"the routed experts do not fit in RAM: cpu needs {gib(plain.total('cpu') + RESERVE['cpu'])}, "
                             f"{gib(ram)} given (short by {gib(-room(plain, 'cpu'))})")
    layers = _moe_layers(config, dtype)
    all_on_gpu = usage_of(placement_rules(base_text, gpu_layers=layers, hot={}, prefill_threshold=None))
    # streamed prefill first (it takes one layer's buffers), unless every layer's experts fit on the GPU
    streaming = bool(prefill_threshold) and (room(all_on_gpu, "cuda:0") < 0 or room(all_on_gpu, "cpu") < 0)
    if streaming:
        streamed = usage_of(placement_rules(base_text, gpu_layers=[], hot={}, prefill_threshold=prefill_threshold))
        if room(streamed, "cuda:0") < 0 or room(streamed, "cpu") < 0:
            streaming = False
            notes.append("no GPU prefill of CPU experts: its pinned copy or its GPU buffers do not fit")
    threshold = prefill_threshold if streaming else None
    base_usage = usage_of(placement_rules(base_text, gpu_layers=[], hot={}, prefill_threshold=threshold))
    per_layer = _layer_gpu_bytes(source, layers[0], registry, dtype) if layers else 0
    num_experts = _num_experts(config)
    free = room(base_usage, "cuda:0")
    gpu_layers: list[int] = []
    hot: dict[int, list[int]] = {}
    per_expert = per_layer / num_experts
    if cpu_moe_layers is not None:
        gpu_layers = layers[cpu_moe_layers:]
        notes.append(f"--n-cpu-moe {cpu_moe_layers}: the routed experts of {len(gpu_layers)} of {len(layers)} MoE "
                     "layers on the GPU, as asked")
        streaming = bool(prefill_threshold) and len(gpu_layers) < len(layers)
        text_body = placement_rules(base_text, gpu_layers=gpu_layers, prefill_threshold=prefill_threshold)
        usage = usage_of(text_body)
        if streaming and (room(usage, "cuda:0") < 0 or room(usage, "cpu") < 0):
            streaming = False
            notes.append("no GPU prefill of CPU experts: its pinned copy or its GPU buffers do not fit")
            text_body = placement_rules(base_text, gpu_layers=gpu_layers)
            usage = usage_of(text_body)
        short = [d for d in ("cuda:0", "cpu") if room(usage, d) < 0]
        if short:
            raise PlacementError(f"--n-cpu-moe {cpu_moe_layers} does not fit: " + "; ".join(
                f"{d} short by {gib(-room(usage, d))}" for d in short))
        return Plan(_header(path, vram, ram, context, usage, budgets, notes) + text_body, usage, budgets,
                    gpu_layers, {}, streaming, notes)
    if per_layer and free > 0:
        if routing:
            hot = _hottest(routing, int(free // per_expert), num_experts)
            notes.append(f"hot experts by measured routing frequency: {sum(map(len, hot.values()))} of "
                         f"{num_experts * len(layers)}")
        else:
            count = min(int(free // per_layer), len(layers))
            gpu_layers = layers[len(layers) - count:] if count else []
            notes.append(f"no routing measurement: the routed experts of the last {count} of {len(layers)} MoE layers on "
                         f"the GPU (the first {len(layers) - count} stay on the CPU); measure routing "
                         "(--calibrate) to pick hot experts per layer instead")
    text_body = placement_rules(base_text, gpu_layers=gpu_layers, hot=hot, prefill_threshold=threshold)
    usage = usage_of(text_body)
    for _ in range(8):  # the whole file's estimate is the one that counts: give back what overshoots
        over_gpu, over_ram = -room(usage, "cuda:0"), -room(usage, "cpu")
        if over_gpu <= 0 and over_ram <= 0 or not (gpu_layers or hot):
            break
        if gpu_layers:
            keep = len(gpu_layers) - 1 - int(max(over_gpu, 0) // per_layer)
            gpu_layers = gpu_layers[len(gpu_layers) - keep:] if keep > 0 else []
        else:
            keep = sum(map(len, hot.values())) - 1 - int(max(over_gpu, 0) // per_expert)
            hot = _hottest(routing, keep, num_experts) if keep > 0 else {}
        text_body = placement_rules(base_text, gpu_layers=gpu_layers, hot=hot, prefill_threshold=threshold)
        usage = usage_of(text_body)
    short = [d for d in ("cuda:0", "cpu") if room(usage, d) < 0]
    if short:
        raise PlacementError("no placement fits: " + "; ".join(
            f"{d} short by {gib(-room(usage, d))}" for d in short))
    header = _header(path, vram, ram, context, usage, budgets, notes)
    return Plan(header + text_body, usage, budgets, gpu_layers, hot, streaming, notes)


def _header(path, vram, ram, context, usage: MemoryUsage, budgets, notes) -> str:
    lines = [f"# Placement for {Path(path).name}: --vram {gib(vram)} --ram {gib(ram)} --context {context}",
             "# (written by `kt rules suggest`; expected memory per device, reserves not included:"]
    lines += [f"#   {line}" for line in usage.table(budgets).splitlines()]
    lines += [f"# note: {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _moe_layers(config, dtype) -> list[int]:
    """Indices of the decoder layers with a sparse MoE block."""
    from .inject import build_meta_model
    from .modules import module_role
    from .moe import layer_index

    model = build_meta_model(config, dtype)
    return sorted(layer_index(n) for n, m in model.named_modules() if module_role(m) == "moe")


def _num_experts(config) -> int:
    for key in ("n_routed_experts", "num_experts", "num_local_experts"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    raise PlacementError(f"{config.model_type}: no routed experts in the config (not a MoE model)")


def _layer_gpu_bytes(source, layer: int, registry, dtype) -> int:
    from .moe import PROJECTIONS

    op_cls = registry.ops("experts").get("KExpertsGPU")
    device = torch.device("cuda")
    return sum(weight_bytes(source.get(f"model.layers.{layer}.mlp.experts.{p}"), op_cls, device, dtype)
               for p in PROJECTIONS)


def _hottest(routing: Mapping, count: int, num_experts: int) -> dict[int, list[int]]:
    """The ``count`` (layer, expert) pairs with the highest share of their layer's routed tokens."""
    scored = []
    for layer, counts in routing.items():
        total = sum(counts) or 1
        scored += [(c / total, int(layer), e) for e, c in enumerate(counts) if c]
    scored.sort(key=lambda t: (-t[0], t[1], t[2]))
    hot: dict[int, list[int]] = defaultdict(list)
    for _, layer, expert in scored[:count]:
        hot[layer].append(expert)
    return {layer: sorted(ids) for layer, ids in sorted(hot.items())}
