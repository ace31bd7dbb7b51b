"""Rule files: which module becomes which wrapper, running which ops, on which device.

```yaml
- match:
    name: "^model\\.layers\\.\\d+\\.mlp\\.experts$"   # regex searched in the qualified module name
    class: experts                                   # a role (linear/experts/attention/rope) or a class path
  replace:
    class: KExperts                                  # KLinear/KExperts/KAttention/KRoPE, a wrapper's import
                                                     # path, or "default" (keep the module, place it on device)
    device: cpu                                      # where its weights (and its children's) are loaded;
                                                     # "gpu" names the accelerator torch has (cuda, xpu, npu)
    kwargs:                                          # wrapper options (KTransformers spellings)
      prefill_op: KExpertsTorch                      # op names from the registry; `op` sets both
      generate_op: KExpertsCPU
      prefill_device: cpu
      generate_device: cpu
      out_device: cpu                                # where the output goes (default: where the input was)
      prefill_threshold: 1                           # at most this many tokens per sequence -> generate op
      op_kwargs: {}                                  # passed to the op constructors
      backend: torch                                 # pin a backend (plugin, distribution or package name);
                                                     # or prefill_backend / generate_backend for one op
  recursive: false                                   # do not apply rules inside the matched module
  optional: true                                     # matching nothing is not an error
- match:
    name: "^model\\.layers\\.\\d+\\.mlp$"
    class: moe                                       # a sparse MoE block (router + experts children)
  replace:
    class: KMoE                                      # routed experts submitted, shared experts overlapped
    device: cuda                                     # (no ops; kwargs: overlap: true/false)
- transfer_map: {30: "cuda:1"}                       # decoder layers 30.. on cuda:1 (see ktcore.moe)
- extends: default                                   # build on the shipped file for the model (layered)
```

An op name is resolved per device by the registry: the most preferred backend that serves the device and
whose ``available()`` accepts it (``Rule.resolutions`` keeps the explanation ``kt rules check`` prints).
A user's rule file that says ``- extends: default`` builds on the shipped file for its model
(``ktcore.rule_selection.layered``): its rules first, then the default's, which are optional there.

Everything is validated when the file is loaded, before any weight is read; every problem of the file is
reported at once, each with the file, line, rule number and field.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .modules import WRAPPERS, KModule, module_role
from .moe import KMoE, parse_transfer_map
from .ops import ROLES
from .registry import RegistryError, Registry, Resolution, accelerator_present, device_missing_reason, get_registry

RULE_FIELDS = ("match", "replace", "recursive", "optional")
GPU = "gpu"  # a device name in rule files: the accelerator torch has here (cuda for CUDA and ROCm, xpu, npu, ...)
BACKEND_OPTIONS = ("backend", "prefill_backend", "generate_backend")  # taken by the loader, not the wrapper
MATCH_FIELDS = ("name", "class")
REPLACE_FIELDS = ("class", "device", "kwargs")
DEFAULT_CLASS_OPTIONS = ("generate_device", "prefill_device")  # "default" keeps the module: only placement
MATCH_ROLES = (*ROLES, "moe")  # what match.class may name besides a class path
WRAPPER_NAMES: dict[str, type[KModule]] = {**WRAPPERS, "KMoE": KMoE}  # short names replace.class may use


@dataclass
class RuleIssue:
    file: str
    line: int
    rule: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"rule {self.rule}" if self.rule is not None else "file"
        return f"{self.file}:{self.line}: {where}, field '{self.field}': {self.message}"


class RuleError(ValueError):
    """One or more problems in a rule file; ``issues`` holds them, the message lists them all."""

    def __init__(self, issues: Sequence[RuleIssue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


# -- YAML with line numbers --------------------------------------------------------------------------


class _LineMap(dict):
    """A YAML mapping that remembers its own line and each key's line (1-based)."""

    line: int = 0
    key_lines: dict
    duplicates: list


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_line_map(loader: yaml.SafeLoader, node: yaml.MappingNode) -> _LineMap:
    loader.flatten_mapping(node)
    result = _LineMap()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    result.duplicates = []
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            result.duplicates.append((key, key_node.start_mark.line + 1))
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_line_map)


def _line_of(mapping: Any, key: str, fallback: int) -> int:
    if isinstance(mapping, _LineMap):
        return mapping.key_lines.get(key, mapping.line)
    return fallback


# -- rules ---------------------------------------------------------------------------------------------


@dataclass
class Rule:
    file: str
    line: int
    index: int  # 1-based position in its file
    name_regex: re.Pattern | None = None
    match_class: str | None = None  # as written
    match_role: str | None = None
    match_type: type | None = None
    wrapper: type[KModule] | None = None  # None: "default", keep the module
    device: torch.device | None = None  # placement of the module's (and its children's) plain weights
    options: dict[str, Any] = field(default_factory=dict)  # wrapper constructor arguments, ops resolved
    op_names: tuple[str, str] | None = None  # (prefill, generate)
    backends: tuple[str | None, str | None] = (None, None)  # pinned (prefill, generate) backend, if any
    resolutions: dict[str, Resolution] = field(default_factory=dict)  # "prefill"/"generate" -> the choice
    layer: str = "user"  # "default" for the rules of the shipped file a user file extends
    registry: Registry | None = None  # the registry its ops were resolved in
    recursive: bool = True
    optional: bool = False
    matched: int = 0

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def wrapper_name(self) -> str:
        return "default" if self.wrapper is None else self.wrapper.__name__

    def matches(self, qualname: str, module: nn.Module) -> bool:
        if self.name_regex is not None and not self.name_regex.search(qualname):
            return False
        if self.match_role is not None and module_role(module) != self.match_role:
            return False
        if self.match_type is not None and not isinstance(module, self.match_type):
            return False
        return True

    def issue(self, field_name: str, message: str) -> RuleError:
        return RuleError([RuleIssue(self.file, self.line, self.index, field_name, message)])

    def build(self, module: nn.Module, qualname: str, target: torch.device | None = None, *,
              check_target: bool = True) -> KModule:
        """The wrapper for ``module`` (ops not built yet: ``wrapper.build_ops()`` after the whole walk).
        ``target``: the transfer_map device of the layer it is in; every non-CPU device moves there, and
        (``check_target``) the ops must be available on it."""
        assert self.wrapper is not None
        if not self.wrapper.accepts(module):
            raise self.issue(
                "replace.class",
                f"matched module '{qualname}' ({type(module).__name__}), which {self.wrapper.__name__} cannot "
                f"replace: it replaces {self.wrapper.role} modules; narrow match.name or add match.class",
            )
        options = dict(self.options)
        if target is not None and self.wrapper.uses_ops:
            for key in ("prefill_device", "generate_device", "out_device"):
                if options.get(key) is not None and options[key].type != "cpu":
                    options[key] = target
            for i, which in enumerate(("prefill", "generate")):
                device = options[f"{which}_device"]
                resolution = self.registry.resolution(self.wrapper.role, self.op_names[i], device, self.backends[i],
                                                      check=check_target)
                if resolution.chosen is None:
                    raise self.issue(f"replace.kwargs.{which}_op", f"transfer_map puts '{qualname}' on {device}, "
                                     f"where op '{self.op_names[i]}' cannot run: {resolution.explain()}")
                options[f"{which}_op"] = resolution.chosen.cls
        return self.wrapper(module, name=qualname, build=False, **options)


@dataclass
class RuleSet:
    rules: list[Rule]
    files: list[str]
    transfer_map: dict[int, torch.device] = field(default_factory=dict)  # layer index -> device (ktcore.moe)
    extends_default: bool = False  # True when a file says `- extends: default`

    def first_match(self, qualname: str, module: nn.Module) -> Rule | None:
        for rule in self.rules:
            if rule.matches(qualname, module):
                return rule
        return None

    def op_names(self) -> set[str]:
        return {n for r in self.rules if r.op_names for n in r.op_names}

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)


def load_rules(
    paths: str | Path | Iterable[str | Path] | RuleSet,
    registry: Registry | None = None,
    *,
    check_devices: bool = True,
    gpu: str | None = None,
) -> RuleSet:
    """Load and validate one or more rule files (concatenated in order: first match wins across them).

    ``check_devices=False`` checks ops and devices by name only (for files meant for another machine);
    ``gpu``: the device type the device name ``gpu`` stands for (default: the accelerator torch has here).
    """
    if isinstance(paths, RuleSet):
        return paths
    if isinstance(paths, (str, Path)):
        paths = [paths]
    registry = registry if registry is not None else get_registry()
    rules: list[Rule] = []
    issues: list[RuleIssue] = []
    files = []
    transfer_map: dict[int, torch.device] = {}
    settings: dict[str, Any] = {}
    for path in paths:
        path = Path(path)
        files.append(str(path))
        try:
            text = path.read_text()
        except OSError as exc:
            issues.append(RuleIssue(str(path), 0, None, "file", f"cannot read rule file: {exc}"))
            continue
        file_rules, file_issues = parse_rules(text, str(path), registry, check_devices=check_devices,
                                              transfer_map=transfer_map, settings=settings, gpu=gpu)
        rules.extend(file_rules)
        issues.extend(file_issues)
    if issues:
        raise RuleError(issues)
    return RuleSet(rules, files, transfer_map, extends_default=settings.get("extends") == "default")


def parse_rules(
    text: str, filename: str, registry: Registry, *, check_devices: bool = True,
    transfer_map: dict[int, torch.device] | None = None, settings: dict[str, Any] | None = None,
    gpu: str | None = None,
) -> tuple[list[Rule], list[RuleIssue]]:
    """Parse rule-file text; returns the rules and every problem found (both lists may be non-empty).
    ``- transfer_map: {...}`` entries are merged into ``transfer_map``, ``- extends: default|none`` goes to
    ``settings["extends"]`` (when given)."""
    try:
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        return [], [RuleIssue(filename, line, None, "yaml", f"not valid YAML: {exc.problem or exc}")]
    if data is None:
        return [], []
    if not isinstance(data, list):
        line = getattr(data, "line", 1)
        return [], [RuleIssue(filename, line, None, "file", "a rule file is a YAML list of rules (`- match: ...`)")]
    rules, issues = [], []
    for index, entry in enumerate(data, start=1):
        if isinstance(entry, dict) and "extends" in entry:
            line = _line_of(entry, "extends", getattr(entry, "line", 0))
            if entry["extends"] not in ("default", "none") or len(entry) != 1:
                issues.append(RuleIssue(filename, line, index, "extends",
                                        f"'- extends: default' or '- extends: none' alone, got {dict(entry)!r}"))
            elif settings is not None:
                settings["extends"] = entry["extends"]
            continue
        if isinstance(entry, dict) and "transfer_map" in entry:
            issues.extend(_check_transfer_map(entry, filename, index, check_devices,
                                              transfer_map if transfer_map is not None else {}))
            continue
        checker = _RuleChecker(filename, index, entry, registry, check_devices, gpu)
        rule = checker.check()
        issues.extend(checker.issues)
        if rule is not None and not checker.issues:
            rules.append(rule)
    return rules, issues


def _check_transfer_map(entry: dict, filename: str, index: int, check_devices: bool,
                        into: dict[int, torch.device]) -> list[RuleIssue]:
    """A ``- transfer_map: {layer: device}`` entry, merged into ``into``; returns its problems."""
    line = _line_of(entry, "transfer_map", getattr(entry, "line", 0))
    issues = [RuleIssue(filename, _line_of(entry, key, line), index, key, "a transfer_map entry takes no other field")
              for key in entry if key != "transfer_map"]
    parsed, problems = parse_transfer_map(entry["transfer_map"])
    issues += [RuleIssue(filename, line, index, "transfer_map", p) for p in problems]
    for layer, device in parsed.items():
        missing = device_missing_reason(device) if check_devices else None
        if missing:
            issues.append(RuleIssue(filename, line, index, "transfer_map", f"layer {layer}: device '{device}' is not "
                                    f"present: {missing}"))
        elif into.get(layer, device) != device:
            issues.append(RuleIssue(filename, line, index, "transfer_map", f"layer {layer} is already mapped to "
                                    f"{into[layer]}, not {device}"))
        else:
            into[layer] = device
    return issues


class _RuleChecker:
    """Validates one rule entry, collecting every problem instead of stopping at the first."""

    def __init__(self, filename: str, index: int, entry: Any, registry: Registry, check_devices: bool,
                 gpu: str | None = None):
        self.gpu = gpu
        self.filename = filename
        self.index = index
        self.entry = entry
        self.registry = registry
        self.check_devices = check_devices
        self.line = getattr(entry, "line", 0)
        self.issues: list[RuleIssue] = []
        self.absent_devices: set[torch.device] = set()  # reported once; ops on them are checked by name only

    def add(self, field_name: str, message: str, line: int | None = None) -> None:
        issue = RuleIssue(self.filename, line or self.line, self.index, field_name, message)
        if issue not in self.issues:  # one op name checked as both prefill and generate op
            self.issues.append(issue)

    def unknown_keys(self, mapping: dict, allowed: Sequence[str], prefix: str) -> None:
        for key in mapping:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                self.add(f"{prefix}{key}", f"unknown field{hint}; allowed: {', '.join(allowed)}", _line_of(mapping, key, self.line))
        for key, line in getattr(mapping, "duplicates", []):
            self.add(f"{prefix}{key}", "given twice in one mapping", line)

    def check(self) -> Rule | None:
        entry = self.entry
        if not isinstance(entry, dict):
            self.add("rule", f"each rule is a mapping with 'match' and 'replace', got {type(entry).__name__}")
            return None
        rule = Rule(file=self.filename, line=self.line, index=self.index)
        self.unknown_keys(entry, RULE_FIELDS, "")
        for flag in ("recursive", "optional"):
            if flag in entry:
                if isinstance(entry[flag], bool):
                    setattr(rule, flag, entry[flag])
                else:
                    self.add(flag, f"must be true or false, got {entry[flag]!r}", _line_of(entry, flag, self.line))
        self.check_match(entry.get("match"), rule)
        self.check_replace(entry.get("replace"), rule)
        return rule

    def check_match(self, match: Any, rule: Rule) -> None:
        if not isinstance(match, dict) or not ("name" in match or "class" in match):
            self.add("match", "required: a mapping with 'name' (regex) and/or 'class'", _line_of(self.entry, "match", self.line))
            return
        self.unknown_keys(match, MATCH_FIELDS, "match.")
        if "name" in match:
            line = _line_of(match, "name", self.line)
            pattern = match["name"]
            if not isinstance(pattern, str):
                self.add("match.name", f"must be a regex string, got {pattern!r}", line)
            else:
                try:
                    rule.name_regex = re.compile(pattern)
                except re.error as exc:
                    self.add("match.name", f"bad regex {pattern!r}: {exc}", line)
        if "class" in match:
            line = _line_of(match, "class", self.line)
            value = match["class"]
            rule.match_class = str(value)
            if value in MATCH_ROLES:
                rule.match_role = value
            else:
                try:
                    cls = _import_object(str(value))
                except ImportError as exc:
                    self.add("match.class", f"neither a role ({', '.join(MATCH_ROLES)}) nor an importable class: {exc}", line)
                    return
                if not isinstance(cls, type):
                    self.add("match.class", f"{value!r} is not a class", line)
                    return
                rule.match_type = cls

    def check_replace(self, replace: Any, rule: Rule) -> None:
        if not isinstance(replace, dict) or "class" not in replace:
            self.add("replace", "required: a mapping with 'class' (a wrapper or \"default\")", _line_of(self.entry, "replace", self.line))
            return
        self.unknown_keys(replace, REPLACE_FIELDS, "replace.")
        line = _line_of(replace, "class", self.line)
        class_name = replace["class"]
        wrapper = None
        if class_name != "default":
            wrapper = self.resolve_wrapper(class_name, line)
            if wrapper is None:
                return
        rule.wrapper = wrapper
        base_device = None
        if "device" in replace:
            base_device = self.device(replace["device"], "replace.device", _line_of(replace, "device", self.line))
        kwargs = replace.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            self.add("replace.kwargs", f"must be a mapping, got {kwargs!r}", _line_of(replace, "kwargs", self.line))
            return
        kw_line = lambda key: _line_of(kwargs, key, _line_of(replace, "kwargs", self.line))  # noqa: E731
        allowed = DEFAULT_CLASS_OPTIONS if wrapper is None else (
            (*wrapper.rule_options, *BACKEND_OPTIONS) if wrapper.uses_ops else wrapper.rule_options)
        for key in kwargs:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                target = "class \"default\" (which keeps the module)" if wrapper is None else wrapper.__name__
                self.add(f"replace.kwargs.{key}", f"unknown kwarg for {target}{hint}; it takes: {', '.join(allowed)}", kw_line(key))
        for key, dup_line in getattr(kwargs, "duplicates", []):
            self.add(f"replace.kwargs.{key}", "given twice in one mapping", dup_line)

        devices = {}
        for key in ("generate_device", "prefill_device", "out_device"):
            if key in kwargs and key in allowed:
                devices[key] = self.device(kwargs[key], f"replace.kwargs.{key}", kw_line(key))
        generate_device = devices.get("generate_device") or base_device or torch.device("cpu")
        prefill_device = devices.get("prefill_device") or generate_device
        rule.device = base_device or devices.get("generate_device") or devices.get("prefill_device")
        if wrapper is None:
            return

        if (
            rule.match_role is not None
            and rule.match_role != wrapper.role
        ):
            self.add("replace.class", f"{wrapper.__name__} replaces {wrapper.role} modules but match.class is '{rule.match_role}'", line)
        if not wrapper.uses_ops:  # a wrapper that runs its children: its own options only
            for key in kwargs:
                problem = wrapper.check_option(key, kwargs[key]) if key in allowed else None
                if problem:
                    self.add(f"replace.kwargs.{key}", problem, kw_line(key))
            rule.options = {k: v for k, v in kwargs.items() if k in allowed}
            return
        names = {}
        for key in ("op", "prefill_op", "generate_op", *BACKEND_OPTIONS):
            if key in kwargs:
                if not isinstance(kwargs[key], str):
                    what = "an op name" if key.endswith("op") else "a backend (plugin) name"
                    self.add(f"replace.kwargs.{key}", f"must be {what}, got {kwargs[key]!r}", kw_line(key))
                else:
                    names[key] = kwargs[key]
        prefill_name = names.get("prefill_op") or names.get("op") or names.get("generate_op")
        generate_name = names.get("generate_op") or names.get("op") or names.get("prefill_op")
        if prefill_name is None:
            self.add("replace.kwargs", f"{wrapper.__name__} needs an op: give generate_op and/or prefill_op (or op for both)",
                     _line_of(replace, "kwargs", line))
            return
        prefill_key = "prefill_op" if "prefill_op" in names else ("op" if "op" in names else "generate_op")
        generate_key = "generate_op" if "generate_op" in names else ("op" if "op" in names else "prefill_op")
        rule.backends = (names.get("prefill_backend", names.get("backend")),
                         names.get("generate_backend", names.get("backend")))
        rule.registry = self.registry
        prefill_cls = self.op(rule, "prefill", wrapper.role, prefill_name, prefill_device, prefill_key, kw_line(prefill_key))
        generate_cls = self.op(rule, "generate", wrapper.role, generate_name, generate_device, generate_key,
                               kw_line(generate_key))
        rule.op_names = (self.registry.canonical(prefill_name), self.registry.canonical(generate_name))

        threshold = kwargs.get("prefill_threshold", 1)
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            self.add("replace.kwargs.prefill_threshold", f"must be an integer >= 1, got {threshold!r}", kw_line("prefill_threshold"))
        op_kwargs = kwargs.get("op_kwargs") or {}
        if not isinstance(op_kwargs, dict):
            self.add("replace.kwargs.op_kwargs", f"must be a mapping, got {op_kwargs!r}", kw_line("op_kwargs"))
        handled = {"op", "prefill_op", "generate_op", "prefill_device", "generate_device", "out_device",
                   "prefill_threshold", "op_kwargs", *BACKEND_OPTIONS}
        for key in kwargs:  # a wrapper's own options (e.g. KExperts placement) go to it as they are
            problem = wrapper.check_option(key, kwargs[key]) if key in allowed and key not in handled else None
            if problem:
                self.add(f"replace.kwargs.{key}", problem, kw_line(key))
        rule.options = {
            **{k: v for k, v in kwargs.items() if k in allowed and k not in handled},
            "prefill_op": prefill_cls,
            "generate_op": generate_cls,
            "prefill_device": prefill_device,
            "generate_device": generate_device,
            "out_device": devices.get("out_device"),
            "prefill_threshold": threshold,
            "op_kwargs": dict(op_kwargs) if isinstance(op_kwargs, dict) else {},
        }

    def resolve_wrapper(self, class_name: Any, line: int) -> type[KModule] | None:
        if not isinstance(class_name, str):
            self.add("replace.class", f"must be a wrapper name, got {class_name!r}", line)
            return None
        if class_name in WRAPPER_NAMES:
            return WRAPPER_NAMES[class_name]
        try:
            cls = _import_object(class_name)
        except ImportError as exc:
            close = difflib.get_close_matches(class_name.rsplit(".", 1)[-1], list(WRAPPER_NAMES), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            self.add("replace.class", f"unknown wrapper {class_name!r}{hint}: {exc}; use \"default\", "
                     f"{', '.join(WRAPPER_NAMES)} or the import path of a ktcore.modules.KModule subclass", line)
            return None
        if not (isinstance(cls, type) and issubclass(cls, KModule)):
            self.add("replace.class", f"{class_name!r} is not a wrapper (a subclass of ktcore.modules.KModule)", line)
            return None
        return cls

    def device(self, value: Any, field_name: str, line: int) -> torch.device | None:
        if isinstance(value, str) and value.partition(":")[0] == GPU:
            if self.check_devices and self.gpu is None and not accelerator_present():
                self.add(field_name, f"device '{value}' is not present: torch has no accelerator on this machine "
                         "(no CUDA, ROCm, XPU or NPU)", line)
                return None
            value = (self.gpu or accelerator_type()) + value[len(GPU):]
        try:
            device = torch.device(str(value) if isinstance(value, int) else value)
        except (RuntimeError, TypeError):
            kind = str(value).split(":")[0]
            provider = self.registry.device_hint(kind)
            why = (f"this torch build does not know the device type '{kind}'; it comes with {provider}"
                   if provider else "not a torch device such as cpu, cuda, cuda:1, xpu")
            self.add(field_name, f"device {value!r}: {why}", line)
            return None
        if self.check_devices:
            missing = device_missing_reason(device)
            if missing:
                self.add(field_name, f"device '{device}' is not present: {missing}", line)
                self.absent_devices.add(device)
        return device

    def op(self, rule: Rule, which: str, role: str, name: str, device: torch.device, key: str, line: int):
        """The class of the backend that runs op ``name`` on ``device`` (by device type alone when devices
        are not checked or the device is absent); the choice is kept in ``rule.resolutions``."""
        field_name = f"replace.kwargs.{key}"
        pinned = rule.backends[0 if which == "prefill" else 1]
        check = self.check_devices and device not in self.absent_devices
        try:
            if check:
                self.registry.resolve(role, name, device, pinned)  # raises with the device's own problem
            resolution = self.registry.resolution(role, name, device, pinned, check=check)
        except RegistryError as exc:
            self.add(field_name, str(exc), line)
            return None
        if resolution.chosen is None:
            self.add(field_name, f"op '{name}' cannot run on '{device}': {resolution.explain()}", line)
            return None
        rule.resolutions[which] = resolution
        return resolution.chosen.cls


def accelerator_type() -> str:
    """The device type ``gpu`` means here; ``cuda`` where torch has no accelerator (checks by name only)."""
    accelerator = torch.accelerator.current_accelerator()
    return accelerator.type if accelerator is not None else "cuda"


def _import_object(path: str) -> Any:
    """``package.module.Name`` -> the object (classes nested in modules only)."""
    if "." not in path:
        raise ImportError(f"{path!r} is not an import path (package.module.Class)")
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import {module_name!r} for {path!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise ImportError(f"module {module_name!r} has no {attr!r}") from exc
