"""Build a Transformers model on the meta device, replace modules by rules, load weights through ops."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .embedding import can_keep_quantized, keep_quantized
from .modules import KModule, declare_output_head, declare_sibling_linears, module_role
from .moe import LayerDevices, install_transfer_hooks, link_moe_blocks, parse_transfer_map
from .ops import Op
from .registry import Registry, device_missing_reason, get_registry
from .rule_selection import RULE_FILES_DIR, layered, rule_search_dirs, rule_variant, select_rule_file  # noqa: F401 (re-exported)
from .rules import Rule, RuleError, RuleIssue, RuleSet, load_rules

# GGML float types that are plain little-endian values: read them without the dequantizer table
_PLAIN_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class LoadError(ValueError):
    """A model cannot be built or loaded; the message names the tensor, module or file."""


# -- building --------------------------------------------------------------------------------------------


def build_meta_model(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The Transformers causal-LM class for ``config``, with every tensor on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)


@dataclass
class ReportRow:
    module: str
    rule: str  # "file:line" of the rule that decided the module
    wrapper: str
    prefill_op: str = ""
    generate_op: str = ""
    device: str = ""
    role: str = ""  # linear / experts / attention / rope / moe, "" for a module kept as it is
    module_class: str = ""  # the Transformers class it replaced (or kept)
    prefill_backend: str = ""  # the plugin whose backend runs the op ("torch", "cpu_amx", ...)
    generate_backend: str = ""
    explain: list[str] = field(default_factory=list)  # per op: the registry's reasons for its choice


@dataclass
class InjectReport:
    rows: list[ReportRow] = field(default_factory=list)
    rule_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # decisions taken at load (e.g. gpu_prefill_threshold: auto)

    def table(self) -> str:
        header = ("module", "rule", "wrapper", "prefill op", "generate op", "device")
        op = lambda name, backend: f"{name} ({backend})" if name and backend else name  # noqa: E731
        data = [(r.module, r.rule, r.wrapper, op(r.prefill_op, r.prefill_backend), op(r.generate_op, r.generate_backend),
                 r.device) for r in self.rows]
        widths = [max(len(h), *(len(d[i]) for d in data)) if data else len(h) for i, h in enumerate(header)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out = [line(header), line(["-" * w for w in widths])]
        out += [line(d) for d in data]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    def __len__(self) -> int:
        return len(self.rows)


def _set_child(parent: nn.Module, name: str, module: nn.Module) -> None:
    if isinstance(parent, KModule):
        parent.replace_child(name, module)
    else:
        setattr(parent, name, module)


def inject(model: nn.Module, rules: RuleSet | str | Path | list, registry: Registry | None = None, *,
           build_ops: bool = True, transfer_map: dict | None = None) -> InjectReport:
    """Replace ``model``'s modules as the rules say (first matching rule wins) and build the wrappers' ops.

    A rule with ``recursive: false`` stops rules from applying inside the module it matched. A rule that
    matched nothing is an error unless it is ``optional: true``. ``build_ops=False`` is a dry run (``kt rules
    check``): the wrappers are placed but their ops are not constructed. ``transfer_map`` (``{layer index:
    device}``, over the rule files' own) puts decoder layers on other devices (see ``ktcore.moe``).
    """
    rules = load_rules(rules, registry)
    for rule in rules:
        rule.matched = 0
    report = InjectReport(rule_files=list(rules.files))
    wrappers: list[tuple[KModule, Rule]] = []
    placements: dict[str, torch.device] = {}
    layer_devices = _layer_devices(model, rules, transfer_map, check_devices=build_ops)

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            qualname = f"{prefix}{name}"
            rule = rules.first_match(qualname, child)
            target = layer_devices.target(qualname) if layer_devices is not None else None
            if rule is not None:
                rule.matched += 1
                original_class = type(child).__name__
                if rule.device is not None:
                    placements[qualname] = LayerDevices.remap(rule.device, target)
                if rule.wrapper is not None:
                    wrapper = rule.build(child, qualname, target, check_target=build_ops)
                    _set_child(parent, name, wrapper)
                    wrappers.append((wrapper, rule))
                    child = wrapper
                    if wrapper.uses_ops:
                        report.rows.append(ReportRow(
                            qualname, rule.location, rule.wrapper_name, rule.op_names[0], rule.op_names[1],
                            _devices_label(wrapper.prefill_device, wrapper.generate_device), wrapper.role,
                            original_class, wrapper.prefill_op_cls.plugin, wrapper.generate_op_cls.plugin,
                            list(dict.fromkeys(r.explain() for r in rule.resolutions.values()))))
                    else:
                        report.rows.append(ReportRow(qualname, rule.location, rule.wrapper_name, "", "",
                                                     str(placements.get(qualname, "")), wrapper.role,
                                                     original_class))
                else:
                    report.rows.append(ReportRow(qualname, rule.location, "default", "", "",
                                                 str(rule.device) if rule.device else "", module_role(child) or "",
                                                 original_class))
                if not rule.recursive:
                    continue
            walk(child, qualname + ".")

    walk(model, "")
    unmatched = [r for r in rules if r.matched == 0 and not r.optional]
    if unmatched:
        raise RuleError([
            RuleIssue(r.file, r.line, r.index, "match", "this rule matched no module of the model "
                      f"({type(model).__name__}); fix match.name/match.class or mark it `optional: true`")
            for r in unmatched
        ])
    for wrapper, rule in wrappers if build_ops else []:
        try:
            wrapper.build_ops()
        except (TypeError, ValueError) as exc:
            raise rule.issue("replace.kwargs", f"building the ops of '{wrapper.qualname}' failed: {exc}") from exc
    if build_ops:
        declare_sibling_linears(model)  # q/k/v, gate/up: an op may plan one fused call for its group
        declare_output_head(model)  # the logits: an op may compute them more exactly
        link_moe_blocks(model)  # KMoE blocks in order: expert deferral, streamed experts' prefetch
    if layer_devices is not None:
        for layer_name, device in layer_devices.moved_layers():
            placements.setdefault(layer_name, device)  # a moved layer's weights no rule placed
        model._ktcore_transfer_hooks = install_transfer_hooks(model, layer_devices)
    model._ktcore_placements = placements  # read by load_weights: where each matched module's weights go
    return report


def _layer_devices(model: nn.Module, rules: RuleSet, transfer_map: dict | None, *,
                   check_devices: bool = True) -> LayerDevices | None:
    """The rule files' transfer_map updated by the caller's, resolved against ``model``."""
    merged = dict(rules.transfer_map)
    if transfer_map:
        parsed, problems = parse_transfer_map(transfer_map)
        if check_devices:
            problems += [f"layer {i}: device '{d}' is not present: {why}" for i, d in parsed.items()
                         if (why := device_missing_reason(d))]
        if problems:
            raise LoadError(f"transfer_map {transfer_map!r}: {'; '.join(problems)}")
        merged.update(parsed)
    if not merged:
        return None
    try:
        return LayerDevices(model, merged)
    except ValueError as exc:
        raise LoadError(str(exc)) from exc


def _devices_label(prefill: torch.device, generate: torch.device) -> str:
    return str(prefill) if prefill == generate else f"{prefill} / {generate}"


def weight_type_problems(model: nn.Module, source, report: InjectReport) -> list[RuleIssue]:
    """Each tensor an op would load whose GGML type that op cannot take (``Op.ggml_type_problem``), found
    from the source's tensor headers before anything is loaded; each issue names the rule that chose it."""
    rules = {row.module: row.rule for row in report.rows}
    issues = []
    for qualname, wrapper in _iter_modules(model):
        if not isinstance(wrapper, KModule) or not wrapper.uses_ops:
            continue
        file, _, line = rules.get(qualname, ":0").rpartition(":")
        for local in wrapper.weight_names():
            try:
                ggml_type = source.get(f"{qualname}.{local}").ggml_type
            except KeyError:
                continue  # reported by loading, with the file's own words
            for which, op_cls in (("prefill_op", wrapper.prefill_op_cls), ("generate_op", wrapper.generate_op_cls)):
                why = op_cls.ggml_type_problem(ggml_type)
                if why:
                    issues.append(RuleIssue(file, int(line or 0), None, f"replace.kwargs.{which}",
                                            f"tensor '{qualname}.{local}': {why}"))
    return [issue for i, issue in enumerate(issues) if issue not in issues[:i]]


# -- loading ---------------------------------------------------------------------------------------------


def to_torch(qt, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A ``QuantizedTensor`` as a plain tensor (float types reinterpreted, others dequantized)."""
    plain = _PLAIN_TYPES.get(qt.ggml_type)
    if plain is not None:
        return qt.data.view(plain).reshape(qt.shape).to(device=device, dtype=dtype)
    return qt.dequantize(dtype, device)


def _iter_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Every module with its qualified name, not descending into ops (they load their own tensors)."""
    yield prefix, module
    for name, child in module._modules.items():
        if child is None or isinstance(child, Op):
            continue
        yield from _iter_modules(child, f"{prefix}.{name}" if prefix else name)


def _placement(qualname: str, placements: dict[str, torch.device], default: torch.device) -> torch.device:
    parts = qualname.split(".") if qualname else []
    for i in range(len(parts), 0, -1):
        device = placements.get(".".join(parts[:i]))
        if device is not None:
            return device
    return default


def _tied_aliases(model: nn.Module, source) -> dict[str, str]:
    """Output-embedding weight name -> input-embedding weight name, when the config ties them and the
    source has no separate output weights."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)):
        return {}
    aliases = {}
    tied = getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, dict):
        aliases.update(tied)
    if not aliases:
        names = {id(m): n for n, m in model.named_modules()}
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and inp is not None:
            aliases[f"{names[id(out)]}.weight"] = f"{names[id(inp)]}.weight"
    have = set(source.names())
    return {t: o for t, o in aliases.items() if t not in have}


class _AliasSource:
    """A source that answers aliased names (tied embeddings) with the tensor they alias."""

    def __init__(self, source, aliases: dict[str, str]):
        self.inner = source
        self.aliases = aliases
        self.path = getattr(source, "path", "")

    def get(self, name: str):
        try:
            return self.inner.get(self.aliases.get(name, name))
        except KeyError as exc:
            from .weights.source import MissingTensorError

            if isinstance(exc, MissingTensorError):
                raise
            raise MissingTensorError(f"tensor '{name}' is not in {self.path or 'the weight source'}") from exc

    def names(self):
        return self.inner.names()

    def release(self, name: str) -> None:
        """Let a mapped source drop the pages of ``name`` once it was copied (GGUFSource.release)."""
        release = getattr(self.inner, "release", None)
        if release is not None:
            release(self.aliases.get(name, name))


def load_weights(model: nn.Module, source, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 progress: bool = True) -> None:
    """Fill an injected meta model from ``source``: wrappers through their ops, every other parameter and
    persistent buffer dequantized to ``dtype`` on its placement device, non-persistent buffers recomputed
    by Transformers' own ``_init_weights`` (rotary tables), then ``post_load()`` on every op."""
    from tqdm.auto import tqdm

    dtype = dtype or torch.float32
    default_device = torch.device(device or "cpu")
    placements = getattr(model, "_ktcore_placements", {})
    src = _AliasSource(source, _tied_aliases(model, source))

    plain: list[tuple[str, nn.Module, str, bool]] = []  # (qualname, owner, local name, is_parameter)
    wrappers: list[tuple[str, KModule]] = []
    for qualname, module in _iter_modules(model):
        if isinstance(module, KModule):
            wrappers.append((qualname, module))
        for local, p in module._parameters.items():
            if p is not None:
                plain.append((qualname, module, local, True))
        for local, b in module._buffers.items():
            if b is not None and local not in module._non_persistent_buffers_set:
                plain.append((qualname, module, local, False))

    tied = Counter(id((module._parameters if is_param else module._buffers)[local]) for _, module, local, is_param in plain)
    total = len(plain) + sum(len(w.weight_names()) for _, w in wrappers)
    bar = tqdm(total=total, desc="loading", unit="tensor", disable=not progress, leave=False)
    loaded_bytes = 0
    counted: set[str] = set()  # tensor names whose bytes are in loaded_bytes
    done: dict[int, torch.Tensor] = {}  # id(meta tensor) -> loaded tensor, so tied tensors stay tied
    try:
        for qualname, wrapper in wrappers:
            weights = {}
            expected = wrapper.expected_shapes()
            for local in wrapper.weight_names():
                full = f"{qualname}.{local}"
                weights[local] = src.get(full)
                _check_shape(full, src, weights[local].shape, expected.get(local))
                if full not in counted:  # a KMoE block reads its experts' tensors too (streamed prefill)
                    counted.add(full)
                    loaded_bytes += weights[local].data.numel()
                _advance(bar, full, loaded_bytes)
            wrapper.load_weights(weights)
            for local in weights:
                src.release(f"{qualname}.{local}")
        for qualname, module, local, is_param in plain:
            full = f"{qualname}.{local}" if qualname else local
            store = module._parameters if is_param else module._buffers
            meta = store[local]
            if id(meta) in done:
                store[local] = done[id(meta)]
                _advance(bar, full, loaded_bytes)
                continue
            if not meta.is_meta:
                _advance(bar, full, loaded_bytes)
                continue
            target = _placement(qualname, placements, default_device)
            try:
                qt = src.get(full)
            except KeyError:
                if not is_param:
                    continue  # persistent buffer absent: recomputed below like non-persistent ones
                raise
            _check_shape(full, src, qt.shape, meta.shape)
            if (local == "weight" and qt.ggml_type not in _PLAIN_TYPES and tied[id(meta)] == 1
                    and can_keep_quantized(module, qt.ggml_type, target)):
                keep_quantized(module, qt, dtype)  # rows dequantized at lookup (ktcore/embedding.py)
                src.release(full)
                loaded_bytes += qt.data.numel()
                done[id(meta)] = module.weight
                _advance(bar, full, loaded_bytes)
                continue
            value = to_torch(qt, dtype if meta.is_floating_point() else meta.dtype, target)
            if value.data_ptr() == qt.data.data_ptr():
                value = value.clone()  # never keep a view on the source's memory as a parameter
            src.release(full)
            loaded_bytes += qt.data.numel()
            tensor = nn.Parameter(value, requires_grad=False) if is_param else value
            store[local] = tensor
            done[id(meta)] = tensor
            _advance(bar, full, loaded_bytes)
    finally:
        bar.close()
    _init_remaining_buffers(model, placements, default_device)
    for _, wrapper in wrappers:
        for op in wrapper.ops():
            op.post_load()
    model.ktcore_loaded_bytes = loaded_bytes


def _check_shape(name: str, source, shape, expected) -> None:
    if expected is not None and tuple(shape) != tuple(expected):
        raise LoadError(f"tensor '{name}' in {source.path or 'the weight source'} has shape {tuple(shape)}, "
                        f"the model (from its config) expects {tuple(expected)}")


def _advance(bar, name: str, loaded_bytes: int) -> None:
    bar.set_postfix_str(f"{loaded_bytes / 2**20:,.0f} MiB  {name}", refresh=False)
    bar.update(1)


def _init_remaining_buffers(model: nn.Module, placements, default_device: torch.device) -> None:
    """Buffers still on meta (rotary ``inv_freq``, Gemma's ``embed_scale``) are computed from the config by
    the model class's own ``_init_weights``, on the module's placement device."""
    pending = []
    for qualname, module in _iter_modules(model):
        if isinstance(module, Op):
            continue
        metas = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not metas:
            continue
        target = _placement(qualname, placements, default_device)
        for local in metas:
            meta = module._buffers[local]
            # NaN marks values _init_weights did not compute, so they are caught below, not used as garbage
            fill = float("nan") if meta.is_floating_point() else 0
            module._buffers[local] = torch.full(meta.shape, fill, dtype=meta.dtype, device=target)
        pending.append((qualname, module, metas))
    if not pending:
        return
    init_fn = getattr(model, "_init_weights", None)
    if init_fn is None:
        raise LoadError(f"buffers {[f'{q}.{n}' for q, _, ns in pending for n in ns]} have no values and "
                        f"{type(model).__name__} has no _init_weights to compute them")
    for qualname, module, metas in pending:
        # protect everything already loaded in this module; only the new buffers are (re)computed
        for tensor in list(module._parameters.values()) + [b for n, b in module._buffers.items() if n not in metas]:
            if tensor is not None:
                tensor._is_hf_initialized = True
        for local in metas:
            module._buffers[local]._is_hf_initialized = False
        init_fn(module)
        for local in metas:
            buffer = module._buffers[local]
            if buffer.is_floating_point() and torch.isnan(buffer).any():
                name = f"{qualname}.{local}" if qualname else local
                raise LoadError(f"buffer '{name}' ({type(module).__name__}) is neither in the weight source nor "
                                f"computed by {type(model).__name__}._init_weights; replace the module by a rule "
                                "(e.g. KRoPE for rotary embeddings) or add the tensor to the weights")


def load_model(path_or_source: Any, rules: Any = None, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None, *, registry: Registry | None = None, progress: bool = True,
               transfer_map: dict | None = None, layout: str | None = None, check_memory: bool = True):
    """Open weights, build the model on meta, inject the rules, load everything. Returns ``(model, report)``.

    ``path_or_source``: a path ``ktcore.weights.open_source`` can open (GGUF file, split GGUF, directory) or a
    ``WeightSource`` object. ``rules``: rule file path(s), layered over the shipped default for the model
    (``ktcore.rule_selection.layered``), or a ``RuleSet`` taken as it is; ``None`` picks the shipped rule
    file for the model type and this machine (``select_rule_file``; ``layout``: ``cpu``, ``gpu-cpu``, ``gpu``). ``transfer_map``: ``{layer index:
    device}`` puts decoder layers from that index on onto that device (over the rule files' own entries).
    ``check_memory``: refuse, before reading weights, a placement that does not fit in the devices' free memory
    (``ktcore.placement.check_fit``).
    """
    registry = registry if registry is not None else get_registry()
    if isinstance(path_or_source, (str, Path)):
        from .weights import open_source  # the weights package owns the file formats

        source = open_source(str(path_or_source))
    else:
        source = path_or_source
    config = source.config()
    variant = rule_variant(source)
    if rules is None:
        rules = select_rule_file(config.model_type, registry, layout, variant=variant)
    elif not isinstance(rules, RuleSet):
        rules = layered(rules, config.model_type, registry, layout=layout, variant=variant)
    ruleset = load_rules(rules, registry)  # validated before anything heavy happens
    model = build_meta_model(config, dtype)
    report = inject(model, ruleset, registry, transfer_map=transfer_map)
    from .placement import resolve_auto_streaming

    decided, usage = resolve_auto_streaming(model, source, dtype, device)
    if decided:
        report.notes.append(decided)
    if check_memory:
        from .placement import PlacementError, check_fit

        try:
            check_fit(model, source, dtype, device, usage=usage)
        except PlacementError as exc:
            raise LoadError(str(exc)) from exc
    load_weights(model, source, dtype=dtype, device=device, progress=progress)
    model.eval()
    if getattr(model, "generation_config", None) is not None:
        # Transformers' generate() would torch.compile a static-cache model on CUDA, tracing into the plugins'
        # C++/Triton calls; ktcore's Generator captures CUDA graphs itself (ktcore/decode_graphs.py).
        model.generation_config.disable_compile = True
    return model, report
