"""Which rule files apply: the shipped ``rules/`` tree (installed as ``ktcore/rule_files``), the layout
for this machine, and a user's file layered over the shipped default for its model.

Layouts: ``cpu`` (everything on the CPU), ``gpu-cpu`` (dense part on the accelerator, routed experts on
the CPU), ``gpu`` (everything on the accelerator). One file per model family and layout serves every
vendor: it names ops (``KLinearGPU``), the registry picks each op's backend on the device.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .registry import Registry, accelerator_present, get_registry
from .rules import RuleError, RuleSet, load_rules

RULE_FILES_DIR = Path(__file__).parent / "rule_files"
LAYOUTS = ("cpu", "gpu-cpu", "gpu")
# a dense family ships no "gpu" file: with no experts to keep on the CPU, its gpu-cpu file is that layout
LAYOUT_FALLBACK = {"gpu": "gpu-cpu"}


def rule_search_dirs(registry: Registry) -> list[Path]:
    """Plugin rule directories (``register_rule_dirs``) first, then ktcore's own tree."""
    return [*registry.rule_dirs(), RULE_FILES_DIR]


def default_layouts() -> list[str]:
    """The layouts tried when none is asked for: ``gpu-cpu`` where torch has an accelerator, then ``cpu``."""
    return (["gpu-cpu"] if accelerator_present() else []) + ["cpu"]


def select_rule_file(model_type: str, registry: Registry | None = None, layout: str | None = None) -> Path:
    """The first shipped rule file for ``model_type`` that can run here, for ``layout`` (else the default
    layouts in order); for each layout, plugin rule directories first, then ktcore's."""
    from .inject import LoadError  # loading's error type; inject imports this module

    registry = registry if registry is not None else get_registry()
    if layout is not None and layout not in LAYOUTS:
        raise LoadError(f"unknown layout {layout!r}; layouts are {', '.join(LAYOUTS)}")
    layouts = [layout] if layout else default_layouts()
    tried = []
    for lay in layouts:
        names = [f"{model_type}-{lay}.yaml"]
        if lay in LAYOUT_FALLBACK and not any((Path(d) / names[0]).is_file() for d in rule_search_dirs(registry)):
            names.append(f"{model_type}-{LAYOUT_FALLBACK[lay]}.yaml")
        for path in (Path(d) / n for n in names for d in rule_search_dirs(registry)):
            if not path.is_file():
                continue
            try:
                load_rules(path, registry)
            except RuleError as exc:
                tried.append(f"{path}: {exc.issues[0]}")
                continue
            return path
    searched = ", ".join(str(d) for d in rule_search_dirs(registry))
    detail = ("\n  " + "\n  ".join(tried)) if tried else ""
    raise LoadError(
        f"no usable rule file for model type '{model_type}' (looked for "
        f"{' then '.join(f'{model_type}-{lay}.yaml' for lay in layouts)} in {searched}){detail}\n"
        "Pass a rule file of your own (load_model(..., rules=PATH); on the command line a RULES argument)."
    )


def is_shipped(path: str | Path, registry: Registry) -> bool:
    return Path(path).resolve().parent in {Path(d).resolve() for d in rule_search_dirs(registry)}


def layered(paths: str | Path | Iterable[str | Path], model_type: str, registry: Registry | None = None, *,
            layout: str | None = None, check_devices: bool = True) -> RuleSet:
    """A user's rule files over the shipped default for ``model_type``: their rules first, then the
    default's, which are optional here (first match wins, so one user rule replaces what it matches and
    the default decides the rest). Not layered: shipped files (complete by themselves), files that say
    ``- extends: none``, and model types without a shipped file."""
    registry = registry if registry is not None else get_registry()
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    user = load_rules(paths, registry, check_devices=check_devices)
    if not user.extends_default or any(is_shipped(p, registry) for p in paths):
        return user
    from .inject import LoadError

    try:
        default_path = select_rule_file(model_type, registry, layout)
    except LoadError:
        return user
    default = load_rules(default_path, registry, check_devices=check_devices)
    for rule in default.rules:
        rule.optional = True
        rule.layer = "default"
    return RuleSet(user.rules + default.rules, user.files + default.files,
                   {**default.transfer_map, **user.transfer_map})
