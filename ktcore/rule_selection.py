"""Which rule files apply: the shipped ``rules/`` tree (installed as ``ktcore/rule_files``), the layout
for this machine, and a user's file layered over the shipped default for its model.

Layouts: ``cpu`` (everything on the CPU), ``gpu-cpu`` (dense part on the accelerator, routed experts on
the CPU), ``gpu`` (everything on the accelerator). One file per model family and layout serves every
vendor: it names ops (``KLinearGPU``), the registry picks each op's backend on the device.

Variants: a safetensors checkpoint whose config says ``quantization_config.quant_method: fp8`` (native FP8)
takes ``<model_type>-fp8-<layout>.yaml`` where the family ships one, else the family's plain file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the registry and rules import torch; the CLI reads LAYOUTS before that import
    from .registry import Registry
    from .rules import RuleSet  # noqa: F401 (annotations)

RULE_FILES_DIR = Path(__file__).parent / "rule_files"
LAYOUTS = ("cpu", "gpu-cpu", "gpu")
# a dense family ships no "gpu" file: with no experts to keep on the CPU, its gpu-cpu file is that layout
LAYOUT_FALLBACK = {"gpu": "gpu-cpu"}
VARIANTS = ("fp8",)  # quantization_config.quant_method values with rule files of their own


def rule_variant(source) -> str | None:
    """The rule-file variant a weight source asks for: the ``quant_method`` of the quantization its files
    declare (``SafetensorsSource.quantization``, from ``config.json``) when that is one of ``VARIANTS``, else
    ``None`` (a GGUF file, even with a ``--model-path`` config that declares one, is not such a checkpoint)."""
    qc = getattr(source, "quantization", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return method if method in VARIANTS else None


def parse_rule_file_name(name: str) -> tuple[str, str | None, str]:
    """``"deepseek_v3-fp8-gpu-cpu.yaml"`` -> ``("deepseek_v3", "fp8", "gpu-cpu")``."""
    stem = name.removesuffix(".yaml")
    layout = next((lay for lay in sorted(LAYOUTS, key=len, reverse=True) if stem.endswith(f"-{lay}")), None)
    if layout is None:
        raise ValueError(f"{name}: not a <model_type>[-<variant>]-<layout>.yaml rule file name ({', '.join(LAYOUTS)})")
    rest = stem[: -len(layout) - 1]
    variant = next((v for v in VARIANTS if rest.endswith(f"-{v}")), None)
    return (rest[: -len(variant) - 1] if variant else rest), variant, layout


def rule_search_dirs(registry: Registry) -> list[Path]:
    """Plugin rule directories (``register_rule_dirs``) first, then ktcore's own tree."""
    return [*registry.rule_dirs(), RULE_FILES_DIR]


def default_layouts() -> list[str]:
    """The layouts tried when none is asked for: ``gpu-cpu`` where torch has an accelerator, then ``cpu``."""
    from .registry import accelerator_present

    return (["gpu-cpu"] if accelerator_present() else []) + ["cpu"]


def select_rule_file(model_type: str, registry: Registry | None = None, layout: str | None = None, *,
                     check_devices: bool = True, gpu: str | None = None, variant: str | None = None) -> Path:
    """The first shipped rule file for ``model_type`` that can run here, for ``layout`` (else the default
    layouts in order); for each layout, plugin rule directories first, then ktcore's. ``check_devices``
    and ``gpu`` as for ``load_rules`` (a file for another machine). ``variant`` (``rule_variant(source)``):
    the ``<model_type>-<variant>-<layout>.yaml`` file is tried before the plain one."""
    from .inject import LoadError  # loading's error type; inject imports this module
    from .registry import get_registry
    from .rules import RuleError, load_rules

    registry = registry if registry is not None else get_registry()
    if layout is not None and layout not in LAYOUTS:
        raise LoadError(f"unknown layout {layout!r}; layouts are {', '.join(LAYOUTS)}")
    layouts = [layout] if layout else default_layouts()
    tried = []
    for lay in layouts:
        names = [f"{model_type}-{lay}.yaml"]
        if lay in LAYOUT_FALLBACK and not any((Path(d) / names[0]).is_file() for d in rule_search_dirs(registry)):
            names.append(f"{model_type}-{LAYOUT_FALLBACK[lay]}.yaml")
        if variant:
            names = [n.replace(f"{model_type}-", f"{model_type}-{variant}-", 1) for n in names] + names
        for path in (Path(d) / n for n in names for d in rule_search_dirs(registry)):
            if not path.is_file():
                continue
            try:
                load_rules(path, registry, check_devices=check_devices, gpu=gpu)
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
            layout: str | None = None, check_devices: bool = True, gpu: str | None = None,
            variant: str | None = None) -> RuleSet:
    """Rule files as given, plus layering: a file that says ``- extends: default`` is followed by the shipped
    file for ``model_type`` (and ``layout``); the rules of a shipped file that comes after a user's file
    (listed, or added that way) are optional. First match wins, so one user rule replaces what it matches
    and the shipped file decides the rest."""
    from .registry import get_registry
    from .rules import RuleSet, load_rules

    registry = registry if registry is not None else get_registry()
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    user = load_rules(paths, registry, check_devices=check_devices, gpu=gpu)
    rules, files, transfer_map = list(user.rules), list(user.files), dict(user.transfer_map)
    if user.extends_default and not any(is_shipped(p, registry) for p in paths):
        default_path = select_rule_file(model_type, registry, layout, check_devices=check_devices, gpu=gpu,
                                        variant=variant)
        default = load_rules(default_path, registry, check_devices=check_devices, gpu=gpu)
        rules += default.rules
        files += default.files
        transfer_map = {**default.transfer_map, **transfer_map}
    first_user = next((f for f in files if not is_shipped(f, registry)), None)
    if first_user is not None:
        for rule in rules:
            if is_shipped(rule.file, registry) and files.index(rule.file) > files.index(first_user):
                rule.optional = True
                rule.layer = "default"
    return RuleSet(rules, files, transfer_map)
