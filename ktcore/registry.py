"""The plugin manager and the op table: ``(role, op name) -> backends``.

An *op* is a role-level name a rule file uses (``KLinearGPU``, ``KExpertsCPU``, ``KAttentionSDPA``). Each
plugin (a *backend*) registers its implementation of an op for the device types it serves, with a
preference; the registry resolves a name on a device to the most preferred backend whose ``available()``
accepts it, and says why every other one was not taken (``Resolution.explain``). A rule may pin one
backend (``backend: kt_rocm``).

Plugins are found through the entry-point group ``ktcore`` (plus ktcore's own plugin ``ktcore.builtin``,
registered as ``torch``). The contract is enforced when a plugin is added: pluggy's ``check_pending()``
rejects a hook no spec knows (a misspelled hook), and the plugin's hooks are called one plugin at a time;
a plugin whose hook raises, or registers something invalid, is not loaded and becomes a *problem* that
``kt plugins`` shows, while the other plugins load. One path (``add_plugin``) collects everything plugins
register: ops, rule directories, weight sources and dequantizers.

``get_registry()`` is the process-wide registry; tests build their own ``Registry(...)``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.resources
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pluggy
import torch
import yaml

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


def accelerator_present() -> bool:
    """Whether torch has an accelerator here (CUDA/ROCm, XPU, MPS, an NPU through its torch extension)."""
    return torch.accelerator.is_available()


# -- what is registered ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """One plugin's implementation of one op: built as ``cls(module, device, **op_kwargs)``."""

    op: str
    role: str
    cls: type[Op]
    plugin: str
    preference: int = 0
    devices: tuple[str, ...] = ()  # torch device types; () = any device torch has

    def serves(self, device_type: str) -> bool:
        return not self.devices or device_type in self.devices

    def problem(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` here, or ``None``."""
        if not self.serves(device.type):
            return f"runs on {', '.join(self.devices)}, not on '{device.type}'"
        try:
            return self.cls.available(device)
        except Exception as exc:  # noqa: BLE001 - a plugin's check failing is itself the reason
            return f"available() raised {type(exc).__name__}: {exc}"

    @property
    def label(self) -> str:
        concrete = "" if self.cls.name == self.op else f" ({self.cls.name})"
        return f"{self.plugin}{concrete}"


@dataclass
class Resolution:
    """Which backend runs op ``op`` on ``device``, and why each other backend did not."""

    op: str
    role: str
    device: torch.device
    chosen: Backend | None
    passed_over: list[tuple[Backend, str]] = field(default_factory=list)
    hint: str = ""  # e.g. which pip install would add a faster backend

    def explain(self) -> str:
        head = (f"{self.op} -> {self.chosen.label} on {self.device}" if self.chosen is not None
                else f"{self.op}: no backend runs on {self.device}")
        parts = [head] + [f"{b.label}: {why}" for b, why in self.passed_over]
        return "; ".join(parts) + (f"; {self.hint}" if self.hint else "")


@dataclass
class PluginInfo:
    name: str
    module: Any
    distribution: str = ""  # "kt-cuda 0.1.0" when it came from an installed distribution
    backends: list[Backend] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    rule_dirs: list[Path] = field(default_factory=list)
    weight_sources: list[type] = field(default_factory=list)
    dequantizers: list[tuple[str, str, Callable]] = field(default_factory=list)

    @property
    def ops(self) -> list[type[Op]]:
        """The op classes this plugin registered (each once)."""
        return list(dict.fromkeys(b.cls for b in self.backends))

    def answers_to(self, wanted: str) -> bool:
        """Whether a rule's ``backend: wanted`` names this plugin: its plugin name, distribution or package
        (``rocm``, ``kt-rocm`` and ``kt_rocm`` all name kt-rocm)."""
        names = {self.name, self.distribution.split(" ")[0], getattr(self.module, "__name__", "").split(".")[0]}
        return _norm(wanted) in {_norm(n) for n in names if n}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


# -- the first-party catalog (install hints only) ----------------------------------------------------------


@lru_cache(maxsize=1)
def catalog() -> tuple[dict, ...]:
    """``rules/backends.yaml``: the first-party backends, the device types and ops each would add. Read
    only to tell a user which ``pip install`` adds something; the registry itself knows only what
    installed plugins register."""
    text = importlib.resources.files("ktcore").joinpath("rule_files", "backends.yaml").read_text()
    return tuple(yaml.safe_load(text))


# -- the registry --------------------------------------------------------------------------------------------


class Registry:
    """Plugins and their ops.

    ``Registry()`` loads ktcore's built-in plugin and every installed ``ktcore`` entry point.
    ``Registry(builtin=False, entrypoints=False, plugins={"mine": obj})`` is what tests use: only the
    given plugins (modules or objects with ``@hookimpl`` methods); those raise on a contract violation
    instead of becoming a problem.
    """

    def __init__(self, *, builtin: bool = True, entrypoints: bool = True, plugins: dict[str, Any] | None = None):
        self.pm = pluggy.PluginManager(PROJECT)
        for spec in SPEC_MODULES:
            self.pm.add_hookspecs(spec)
        self.plugins: dict[str, PluginInfo] = {}
        # problems met while loading plugins (a missing built-in, a broken entry point, a hook that raised):
        # shown by `kt plugins` and appended to unknown-op errors, never silently dropped
        self.problems: list[str] = []
        self._backends: dict[tuple[str, str], list[Backend]] = {}
        self._aliases: dict[str, str] = {}  # another spelling -> op name
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
        self.add_plugin(module, BUILTIN_PLUGIN_NAME, distribution=_dist_label("ktcore"), strict=False)

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
            self.add_plugin(module, ep.name, distribution=dist, strict=False)

    def add_plugin(self, plugin: Any, name: str, distribution: str = "", *, strict: bool = True) -> PluginInfo | None:
        """Register ``plugin`` under ``name``: check its hooks against the specs, call each of them, and
        take what they register only when all succeeded. A failure raises ``RegistryError`` (``strict``) or
        becomes one entry of ``problems`` and the plugin is not loaded (``None`` is returned)."""
        if name in self.plugins:
            raise RegistryError(f"a plugin named '{name}' is already registered")
        label = f"plugin '{name}'" + (f" ({distribution})" if distribution else "")
        try:
            self.pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            return self._refuse(label, f"is not a valid ktcore plugin: {exc}", strict)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            message = self._unknown_hook_message(plugin)
            self.pm.unregister(name=name)
            return self._refuse(label, message, strict, exc)
        info = PluginInfo(name=name, module=plugin, distribution=distribution)
        try:
            for caller in self.pm.get_hookcallers(plugin) or []:
                for impl in caller.get_hookimpls():
                    if impl.plugin is plugin:
                        impl.function(*[self._collector(info, caller.name) for _ in impl.argnames])
            self._check_new(info)
        except Exception as exc:  # noqa: BLE001 - isolate: this plugin fails, the others load
            self.pm.unregister(name=name)
            reason = str(exc) if isinstance(exc, RegistryError) else f"a hook raised {type(exc).__name__}: {exc}"
            return self._refuse(label, f"is not loaded: {reason}", strict, exc)
        self.plugins[name] = info
        for backend in info.backends:
            self._backends.setdefault((backend.role, backend.op), []).append(backend)
            self._backends[backend.role, backend.op].sort(key=lambda b: -b.preference)
            backend.cls.plugin = name  # the plugin that registered the class (one per class in a registry)
        self._aliases.update(info.aliases)
        return info

    def _refuse(self, label: str, message: str, strict: bool, cause: Exception | None = None) -> None:
        text = f"{label} {message}"
        if strict:
            error = cause if isinstance(cause, RegistryError) else RegistryError(text)
            raise error from cause
        self.problems.append(text)
        return None

    def _unknown_hook_message(self, plugin: Any) -> str:
        specs = sorted(n for n in vars(self.pm.hook) if getattr(self.pm.hook, n).has_spec())
        unknown = sorted(c.name for c in self.pm.get_hookcallers(plugin) or [] if not c.has_spec())
        hints = []
        for hook in unknown:
            close = difflib.get_close_matches(hook, specs, n=1)
            hints.append(f"'{hook}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        return (f"is not loaded: it implements {', '.join(hints)}, which no ktcore hookspec defines; "
                f"the hooks are {', '.join(specs)}")

    def _collector(self, info: PluginInfo, hook: str) -> Callable:
        """The ``register`` callable handed to one plugin's implementation of ``hook``."""
        if hook in ROLE_HOOKS:
            role = ROLE_HOOKS[hook]

            def register_op(op_cls, *, op: str | None = None, preference: int | None = None,
                            devices: tuple[str, ...] | None = None, aliases: tuple[str, ...] = ()) -> None:
                backend = self._backend(info, role, op_cls, op, preference, devices)
                info.backends.append(backend)
                for alias in (*aliases, *(op_cls.aliases if op is None else ())):
                    info.aliases[alias] = backend.op

            return register_op
        if hook == "register_rule_dirs":
            return lambda path: info.rule_dirs.append(Path(path))
        if hook == "register_weight_sources":
            return info.weight_sources.append
        if hook == "register_dequantizers":
            return lambda ggml_type, device_type, fn: info.dequantizers.append((ggml_type, device_type, fn))
        raise RegistryError(f"no collector for hook '{hook}'")  # a hookspec was added without one

    def _backend(self, info: PluginInfo, role: str, op_cls: Any, op: str | None, preference: int | None,
                 devices: tuple[str, ...] | None) -> Backend:
        if not (isinstance(op_cls, type) and issubclass(op_cls, Op)):
            raise RegistryError(f"plugin '{info.name}' registered {op_cls!r} as a {role} op; ops must subclass ktcore.Op")
        if not op_cls.name:
            raise RegistryError(f"plugin '{info.name}' registered {op_cls.__qualname__} without a `name`")
        if op_cls.role != role:
            raise RegistryError(
                f"plugin '{info.name}' registered op '{op_cls.name}' (role {op_cls.role!r}) through the {role} hook; "
                f"set `role = {role!r}` or register it through the hook of its role"
            )
        owner = next((b.plugin for bs in self._backends.values() for b in bs if b.cls is op_cls), None)
        if owner and owner != info.name:
            raise RegistryError(f"plugin '{info.name}' registered {op_cls.__qualname__}, which plugin "
                                f"'{owner}' already registered; subclass it to register your own backend")
        return Backend(op or op_cls.name, role, op_cls, info.name,
                       op_cls.preference if preference is None else int(preference),
                       tuple(op_cls.devices if devices is None else devices))

    def _check_new(self, info: PluginInfo) -> None:
        """Names unique across roles; two backends of one op that could both serve a device need distinct
        preferences (else the choice between them would depend on install order)."""
        for new in info.backends:
            for (role, op), backends in self._backends.items():
                if op == new.op and role != new.role:
                    raise DuplicateOpError(
                        f"op name '{op}' is registered twice: as a {role} op by plugin '{backends[0].plugin}' "
                        f"and as a {new.role} op by plugin '{info.name}'; op names must be unique")
                if op != new.op or role != new.role:
                    continue
                for old in backends:
                    overlap = not old.devices or not new.devices or set(old.devices) & set(new.devices)
                    if overlap and old.preference == new.preference:
                        raise DuplicateOpError(
                            f"{role} op '{op}' is registered twice with preference {new.preference} for the same "
                            f"devices: by plugin '{old.plugin}' ({old.cls.__module__}.{old.cls.__qualname__}) and by "
                            f"plugin '{info.name}' ({new.cls.__module__}.{new.cls.__qualname__}); give one backend "
                            "another `preference`, or uninstall one of them")
            alias_target = self._aliases.get(new.op)
            if alias_target is not None:
                raise DuplicateOpError(f"plugin '{info.name}' registers op '{new.op}', which is already another "
                                       f"spelling of op '{alias_target}'")
        for alias, op in info.aliases.items():
            if self._aliases.get(alias, op) != op or (alias in {n for _, n in self._backends} and alias != op):
                raise DuplicateOpError(f"plugin '{info.name}' declares '{alias}' as another spelling of op '{op}', "
                                       f"but it already names op '{self._aliases.get(alias, alias)}'")
        seen = {}
        for b in info.backends:
            key = (b.op, b.devices, b.preference)
            if key in seen and seen[key] is not b.cls:
                raise DuplicateOpError(f"plugin '{info.name}' registers two backends of op '{b.op}' for the same "
                                       f"devices and preference: {seen[key].__qualname__} and {b.cls.__qualname__}")
            seen[key] = b.cls

    # -- queries -------------------------------------------------------------------------------------

    def canonical(self, name: str) -> str:
        """The op a name means (``KLinearMarlin`` is another spelling of ``KLinearGPU``)."""
        return self._aliases.get(name, name)

    def backends(self, role: str, name: str) -> list[Backend]:
        """The backends of op ``name`` (or a spelling of it), most preferred first; ``UnknownOpError``
        says what exists and what to install."""
        if role not in ROLES:
            raise RegistryError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        found = self._backends.get((role, self.canonical(name)))
        if not found:
            raise UnknownOpError(self._unknown_message(role, name))
        return found

    def ops(self, role: str | None = None) -> dict[str, type[Op]]:
        """``{op name: class of its most preferred backend}`` for one role, or for every role."""
        return {name: backends[0].cls for (r, name), backends in self._backends.items() if role is None or r == role}

    def rule_dirs(self) -> list[Path]:
        return [d for info in self.plugins.values() for d in info.rule_dirs]

    def weight_sources(self) -> list[type]:
        return [cls for info in self.plugins.values() for cls in info.weight_sources]

    def dequantizers(self) -> list[tuple[str, str, Callable]]:
        return [d for info in self.plugins.values() for d in info.dequantizers]

    def get(self, role: str, name: str, backend: str | None = None) -> type[Op]:
        """The class of the most preferred backend of ``name`` (or of the pinned ``backend``), whatever the
        device; ``resolve`` also checks the device."""
        return self._pinned(role, name, backend)[0].cls

    def _pinned(self, role: str, name: str, backend: str | None) -> list[Backend]:
        backends = self.backends(role, name)
        if backend is None:
            return backends
        pinned = [b for b in backends if self.plugins[b.plugin].answers_to(backend)]
        if not pinned:
            offered = ", ".join(dict.fromkeys(b.plugin for b in backends))
            hint = self._install_hint(self.canonical(name), backend=backend)
            raise UnknownOpError(f"{role} op '{name}' has no backend '{backend}'; its backends here: {offered}"
                                 + (f". {hint}" if hint else ""))
        return pinned

    def resolution(self, role: str, name: str, device: torch.device | str, backend: str | None = None, *,
                   check: bool = True) -> Resolution:
        """Which backend of ``name`` runs on ``device``: the most preferred one that serves the device type
        and (``check``) whose ``available()`` accepts it. ``check=False`` decides by device type alone (a
        rule file meant for another machine)."""
        device = torch.device(device)
        candidates = self._pinned(role, name, backend)
        op = self.canonical(name)
        result = Resolution(op, role, device, None)
        if not any(b.serves(device.type) for b in candidates):
            result.passed_over = [(b, f"runs on {', '.join(b.devices)}, not on '{device.type}'") for b in candidates]
            return result
        for b in candidates:
            if not b.serves(device.type):
                continue  # another device type's backend: nothing to explain
            why = b.problem(device) if check else None
            if why is None and result.chosen is None:
                result.chosen = b
            else:
                result.passed_over.append((b, why or f"preference {b.preference} < {result.chosen.preference}"))
        if backend is None:
            result.hint = self._install_hint(op, device=device)
        return result

    def resolve(self, role: str, name: str, device: torch.device | str, backend: str | None = None) -> type[Op]:
        """The class of the backend that runs ``name`` on ``device``, which must exist here;
        ``OpUnavailableError`` explains every backend's reason."""
        device = torch.device(device)
        resolution = self.resolution(role, name, device, backend)
        missing = device_missing_reason(device)
        if missing:
            hint = self.device_hint(device.type)
            raise OpUnavailableError(
                f"op '{name}' was asked to run on device '{device}', which is not present: {missing}"
                + (f"; ops for '{device.type}' come from {hint}" if hint else ""))
        if resolution.chosen is None:
            raise OpUnavailableError(f"op '{name}' cannot run on '{device}' here: " + resolution.explain())
        return resolution.chosen.cls

    def device_hint(self, device_type: str) -> str:
        """Which installed plugins, or not-installed first-party distributions, bring ops for ``device_type``."""
        installed = [f"plugin '{b.plugin}'" for bs in self._backends.values() for b in bs
                     if b.devices and device_type in b.devices]
        offered = [f"{e['distribution']} ({e['description']})" for e in catalog()
                   if device_type in e["devices"] and e["plugin"] not in self.plugins]
        return " or ".join(dict.fromkeys(installed + offered))

    def _install_hint(self, op: str, *, device: torch.device | None = None, backend: str | None = None) -> str:
        """Which not-installed first-party distribution adds a backend of ``op`` (for ``device``)."""
        for entry in catalog():
            if entry["plugin"] in self.plugins or op not in entry["ops"]:
                continue
            if device is not None and device.type not in entry["devices"]:
                continue
            if backend is not None and _norm(backend) not in {_norm(entry["plugin"]), _norm(entry["distribution"])}:
                continue
            return f"pip install {entry['distribution']} adds a backend of {op} ({entry['description']})"
        return ""

    def _unknown_message(self, role: str, name: str) -> str:
        known = sorted(n for (r, n) in self._backends if r == role)
        lines = [f"unknown {role} op '{name}'."]
        lines.append(f"Known {role} ops: {', '.join(known) if known else '(none)'}.")
        for (other_role, op), backends in self._backends.items():
            if other_role != role and op == self.canonical(name):
                lines.append(f"'{name}' is a {other_role} op (plugin '{backends[0].plugin}'), not a {role} op.")
        offered = {n: e["distribution"] for e in catalog() if e["plugin"] not in self.plugins for n in e["ops"]}
        installed = {n: bs[0].plugin for (_, n), bs in self._backends.items()}
        installed.update({a: installed.get(op, "") for a, op in self._aliases.items()})
        close = difflib.get_close_matches(name, sorted(set(installed) | set(offered)), n=1, cutoff=0.6)
        if close and close[0] != name:
            match = close[0]
            origin = f"plugin '{installed[match]}'" if match in installed else f"not installed: {offered[match]}"
            lines.append(f"Did you mean '{match}' ({origin})?")
        for candidate in [name] + close[:1]:
            if candidate in offered and candidate not in installed:
                lines.append(f"'{candidate}' is provided by {offered[candidate]}: pip install {offered[candidate]}")
                break
        lines.extend(f"Note: {p}" for p in self.problems)
        return " ".join(lines)


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
