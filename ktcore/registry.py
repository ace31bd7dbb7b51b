"""The plugin manager and the op table ``(role, op name) -> op class``.

Plugins are found through the entry-point group ``ktcore`` (plus ktcore's own built-in plugin
``ktcore.builtin``, registered as ``torch``). Each plugin implements the ``register_*_ops`` hooks; the
registry calls every implementation with a ``register`` callable bound to that plugin, so it knows who
registered what and can name both plugins when a name is registered twice.

``get_registry()`` is the process-wide registry; tests build their own ``Registry(...)``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy
import torch

from .hookspecs import PROJECT, SPEC_MODULES
from .ops import ROLES, Op

BUILTIN_PLUGIN_NAME = "torch"
BUILTIN_PLUGIN_MODULE = "ktcore.builtin"

# hook name -> role of the op classes it registers
ROLE_HOOKS = {
    "register_linear_ops": "linear",
    "register_experts_ops": "experts",
    "register_attention_ops": "attention",
    "register_rope_ops": "rope",
}

# First-party ops that live in separately installed plugins: op name -> distribution that provides it.
# Used only to tell a user which ``pip install`` adds an op the registry does not know.
FIRST_PARTY_OPS = {
    "KLinearCPU": "kt-cpu-amx",
    "KExpertsCPU": "kt-cpu-amx",
    "KLinearMarlin": "kt-cuda",
    "KLinearFP8": "kt-cuda",
    "KExpertsGPU": "kt-cuda",
    "KExpertsMarlin": "kt-cuda",
    "KMLAAttention": "kt-cuda",
    "KAttentionFlashGQA": "kt-cuda",
    "KLinearROCm": "kt-rocm",
    "KExpertsROCm": "kt-rocm",
    "KAttentionROCm": "kt-rocm",
    "KLinearXPU": "kt-xpu",
    "KExpertsXPU": "kt-xpu",
    "KAttentionXPU": "kt-xpu",
    "KLinearAscend": "kt-ascend",
    "KExpertsAscend": "kt-ascend",
    "KAttentionAscend": "kt-ascend",
}

# torch device type -> the first-party plugin(s) that bring ops for it
DEVICE_PLUGINS = {
    "cuda": "kt-cuda (NVIDIA) or kt-rocm (AMD, ROCm builds of torch also use the 'cuda' device type)",
    "xpu": "kt-xpu (Intel GPUs)",
    "npu": "kt-ascend (Huawei Ascend, with torch-npu)",
    "cpu": "kt-cpu-amx (optimized CPU kernels; ktcore's built-in 'torch' plugin also runs on CPU)",
}


class RegistryError(ValueError):
    """A plugin or op problem; the message names the op, the plugin(s) and what to do."""


class UnknownOpError(RegistryError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateOpError(RegistryError):
    pass


class OpUnavailableError(RegistryError):
    pass


def device_missing_reason(device: torch.device | str) -> str | None:
    """``None`` when ``device`` exists on this machine, else why not (e.g. ``cuda`` without CUDA)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        return f"{str(device)!r} is not a device type this torch build knows"
    if device.type in ("cpu", "meta"):
        return None
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if is_available is None:
        return f"this torch build has no '{device.type}' backend (torch.{device.type} is missing)"
    if not is_available():
        return f"torch.{device.type}.is_available() is False on this machine"
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        return f"device {device} does not exist: this machine has {count()} {device.type} device(s)"
    return None


@dataclass
class PluginInfo:
    name: str
    module: Any
    distribution: str = ""  # "kt-cuda 0.1.0" when it came from an installed distribution
    ops: list[type[Op]] = field(default_factory=list)
    rule_dirs: list[Path] = field(default_factory=list)


class Registry:
    """Plugins and their ops.

    ``Registry()`` loads ktcore's built-in plugin and every installed ``ktcore`` entry point.
    ``Registry(builtin=False, entrypoints=False, plugins={"mine": obj})`` is what tests use: only the
    given plugins (modules or objects with ``@hookimpl`` methods).
    """

    def __init__(self, *, builtin: bool = True, entrypoints: bool = True, plugins: dict[str, Any] | None = None):
        self.pm = pluggy.PluginManager(PROJECT)
        for spec in SPEC_MODULES:
            self.pm.add_hookspecs(spec)
        self.plugins: dict[str, PluginInfo] = {}
        # problems met while loading plugins (a missing built-in, a broken entry point): shown by
        # `kt plugins` and appended to unknown-op errors, never silently dropped
        self.problems: list[str] = []
        self._ops: dict[tuple[str, str], type[Op]] = {}
        if builtin:
            self._load_builtin()
        if entrypoints:
            self._load_entrypoints()
        for name, plugin in (plugins or {}).items():
            self.add_plugin(plugin, name)

    # -- loading -------------------------------------------------------------------------------------

    def _load_builtin(self) -> None:
        try:
            module = importlib.import_module(BUILTIN_PLUGIN_MODULE)
        except ModuleNotFoundError as exc:
            if exc.name and BUILTIN_PLUGIN_MODULE.startswith(exc.name):
                self.problems.append(
                    f"ktcore's built-in plugin '{BUILTIN_PLUGIN_NAME}' ({BUILTIN_PLUGIN_MODULE}) is not installed: "
                    "its portable torch ops (KLinearTorch, KExpertsTorch, ...) are unavailable; reinstall ktcore"
                )
                return
            raise
        self.add_plugin(module, BUILTIN_PLUGIN_NAME, distribution=_dist_label("ktcore"))

    def _load_entrypoints(self) -> None:
        seen: dict[str, str] = {}
        for ep in importlib.metadata.entry_points(group=PROJECT):
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else ""
            if ep.name in self.plugins or ep.name in seen:
                if seen.get(ep.name) != ep.value:  # the same entry point found twice on sys.path is harmless
                    owner = self.plugins[ep.name].distribution if ep.name in self.plugins else seen[ep.name]
                    self.problems.append(f"plugin name '{ep.name}' of {dist or ep.value} is skipped: "
                                         f"'{ep.name}' is already taken by {owner or 'another plugin'}")
                continue
            seen[ep.name] = ep.value
            try:
                module = ep.load()
            except Exception as exc:  # a broken third-party plugin must not take the others down
                self.problems.append(
                    f"plugin '{ep.name}' ({dist or ep.value}) failed to import: {type(exc).__name__}: {exc}"
                )
                continue
            self.add_plugin(module, ep.name, distribution=dist)

    def add_plugin(self, plugin: Any, name: str, distribution: str = "") -> PluginInfo:
        """Register ``plugin`` under ``name`` and collect the ops and rule directories it registers."""
        if name in self.plugins:
            raise RegistryError(f"a plugin named '{name}' is already registered")
        self.pm.register(plugin, name=name)
        info = PluginInfo(name=name, module=plugin, distribution=distribution)
        self.plugins[name] = info
        for hook_name, role in ROLE_HOOKS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin_name == name:
                    _call_impl(impl, lambda op_cls, _role=role: self._register_op(info, _role, op_cls))
        for impl in self.pm.hook.register_rule_dirs.get_hookimpls():
            if impl.plugin_name == name:
                _call_impl(impl, lambda path: info.rule_dirs.append(Path(path)))
        return info

    def _register_op(self, info: PluginInfo, role: str, op_cls: Any) -> None:
        if not (isinstance(op_cls, type) and issubclass(op_cls, Op)):
            raise RegistryError(f"plugin '{info.name}' registered {op_cls!r} as a {role} op; ops must subclass ktcore.Op")
        if not op_cls.name:
            raise RegistryError(f"plugin '{info.name}' registered {op_cls.__qualname__} without a `name`")
        if op_cls.role != role:
            raise RegistryError(
                f"plugin '{info.name}' registered op '{op_cls.name}' (role {op_cls.role!r}) through the {role} hook; "
                f"set `role = {role!r}` or register it through the hook of its role"
            )
        key = (role, op_cls.name)
        previous = self._ops.get(key)
        if previous is not None:
            raise DuplicateOpError(
                f"{role} op '{op_cls.name}' is registered twice: by plugin '{previous.plugin}' "
                f"({previous.__module__}.{previous.__qualname__}) and by plugin '{info.name}' "
                f"({op_cls.__module__}.{op_cls.__qualname__}); uninstall one of them or rename the op"
            )
        for other_role in ROLES:
            other = self._ops.get((other_role, op_cls.name))
            if other is not None:
                raise DuplicateOpError(
                    f"op name '{op_cls.name}' is registered twice: as a {other_role} op by plugin '{other.plugin}' "
                    f"and as a {role} op by plugin '{info.name}'; op names must be unique"
                )
        op_cls.plugin = info.name
        self._ops[key] = op_cls
        info.ops.append(op_cls)

    # -- queries -------------------------------------------------------------------------------------

    def ops(self, role: str | None = None) -> dict[str, type[Op]]:
        """``{name: class}`` for one role, or for every role."""
        return {name: cls for (r, name), cls in self._ops.items() if role is None or r == role}

    def rule_dirs(self) -> list[Path]:
        return [d for info in self.plugins.values() for d in info.rule_dirs]

    def get(self, role: str, name: str) -> type[Op]:
        """The op class ``name`` of ``role``; ``UnknownOpError`` says what exists and what to install."""
        if role not in ROLES:
            raise RegistryError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        op_cls = self._ops.get((role, name))
        if op_cls is None:
            raise UnknownOpError(self._unknown_message(role, name))
        return op_cls

    def resolve(self, role: str, name: str, device: torch.device | str) -> type[Op]:
        """``get()`` plus the checks that the op runs on ``device`` and that ``device`` exists here."""
        op_cls = self.get(role, name)
        device = torch.device(device)
        if op_cls.devices and device.type not in op_cls.devices:
            raise OpUnavailableError(
                f"op '{name}' (plugin '{op_cls.plugin}') runs on {', '.join(op_cls.devices)}, not on '{device}'"
            )
        missing = device_missing_reason(device)
        if missing:
            provider = DEVICE_PLUGINS.get(device.type, "")
            raise OpUnavailableError(
                f"op '{name}' (plugin '{op_cls.plugin}') was asked to run on device '{device}', which is not present: "
                f"{missing}" + (f"; ops for '{device.type}' come from {provider}" if provider else "")
            )
        reason = op_cls.available(device)
        if reason:
            raise OpUnavailableError(f"op '{name}' (plugin '{op_cls.plugin}') cannot run on '{device}' here: {reason}")
        return op_cls

    def _unknown_message(self, role: str, name: str) -> str:
        known = sorted(self.ops(role))
        lines = [f"unknown {role} op '{name}'."]
        lines.append(f"Known {role} ops: {', '.join(known) if known else '(none)'}.")
        for other_role in ROLES:
            if other_role != role and (other_role, name) in self._ops:
                lines.append(f"'{name}' is a {other_role} op (plugin '{self._ops[other_role, name].plugin}'), not a {role} op.")
        all_names = sorted({n for (_, n) in self._ops} | set(FIRST_PARTY_OPS))
        close = difflib.get_close_matches(name, all_names, n=1, cutoff=0.6)
        if close and close[0] != name:
            match = close[0]
            where = next((cls.plugin for (r, n), cls in self._ops.items() if n == match), None)
            origin = f"plugin '{where}'" if where else f"not installed: {FIRST_PARTY_OPS[match]}"
            lines.append(f"Did you mean '{match}' ({origin})?")
        if name in FIRST_PARTY_OPS:
            lines.append(f"'{name}' is provided by {FIRST_PARTY_OPS[name]}: pip install {FIRST_PARTY_OPS[name]}")
        elif close and close[0] in FIRST_PARTY_OPS and not any(n == close[0] for (_, n) in self._ops):
            lines.append(f"'{close[0]}' is provided by {FIRST_PARTY_OPS[close[0]]}: pip install {FIRST_PARTY_OPS[close[0]]}")
        lines.extend(f"Note: {p}" for p in self.problems)
        return " ".join(lines)


def _call_impl(impl: Any, register) -> None:
    """Call one plugin's hook implementation with our ``register``; pluggy lets an implementation
    take a subset of the hook's arguments."""
    impl.function(*[register for _ in impl.argnames])


def _dist_label(dist_name: str) -> str:
    try:
        return f"{dist_name} {importlib.metadata.version(dist_name)}"
    except importlib.metadata.PackageNotFoundError:
        return dist_name


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry()
    return _REGISTRY
