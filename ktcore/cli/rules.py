"""``kt rules``: check a rule file against a model without reading weights; list shipped rule files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..rule_selection import LAYOUTS

EPILOG = """\
The dry run builds the model on the meta device (no memory, no weights read), applies the rules exactly as
loading would (first matching rule wins, `recursive: false` respected) and prints what each matched
module becomes: which file and line decided it, which op runs it and which backend (plugin) of that op
was chosen on its device, and why the others were not. Every problem of the rule file (unknown op or
kwarg, absent device, bad regex, a rule that matches nothing) is reported with file, line, rule number
and field. With a GGUF file as --model, every tensor's GGML type is checked against the op that would
load it, before anything is loaded.

A rule file with the entry `- extends: default` builds on the shipped file for the model: its rules
first, then the shipped file's (first match wins), so one rule is enough to change one op.

--model takes a Transformers config directory (with config.json), a GGUF file (its metadata gives the
config) or a model type such as llama, qwen3_moe, deepseek_v3 (Transformers' default config of that type:
the module names are those of every model of the family).

examples:
  kt rules check my-rules.yaml --model ./Qwen3-30B-A3B-Q4_K_M.gguf
  kt rules check my-rules.yaml --model ./DeepSeek-V3-config/
  kt rules check gpu-rules.yaml --model qwen3_moe --any-device    # a file meant for another machine
  kt rules check --model qwen3_moe          # the shipped rule file this machine would pick
  kt rules check --model qwen3_moe --layout gpu --any-device   # the shipped gpu layout, by device type only
  kt rules check --model qwen3_moe --layout gpu --any-device --gpu xpu   # ... as on an Intel GPU machine
  kt rules list                             # shipped rule files and whether they can run here
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "rules",
        help="check rule files against a model (dry run) and list shipped ones",
        description="Check which module of a model becomes which wrapper and op under a rule file, "
        "without loading weights; list the shipped rule files.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="rules_command", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check",
        help="dry-run RULES on a model: the table of what each module becomes",
        description="Dry-run rule files on a model (meta device, no weights read).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("rules", nargs="*", metavar="RULES",
                       help="rule file(s), applied in order; none: the shipped file for the model and this machine")
    check.add_argument("--model", "-m", required=True, metavar="CONFIG_DIR|GGUF|MODEL_TYPE",
                       help="config directory, GGUF file or model type (e.g. qwen3_moe)")
    check.add_argument("--any-device", action="store_true",
                       help="do not require the rule file's devices to exist here (check ops by name only)")
    check.add_argument("--gpu", metavar="DEVICE_TYPE",
                       help="the device type the rule files' device 'gpu' stands for (default: the accelerator "
                       "torch has here); e.g. --gpu xpu --any-device for an Intel GPU machine")
    check.add_argument("--layout", choices=LAYOUTS,
                       help="which shipped layout to use or extend (default: gpu-cpu with an accelerator, else cpu)")
    check.add_argument("--json", action="store_true", help="print the rows as JSON")
    check.set_defaults(func=run_check)
    listing = actions.add_parser("list", help="shipped rule files (plugin directories first) and whether they can run here")
    listing.add_argument("--model-type", help="only files for this model type")
    listing.set_defaults(func=run_list)
    from .suggest import add_parser as add_suggest

    add_suggest(actions)
    return parser


def model_config(spec: str):
    """A Transformers config from a config directory / config.json, a weight file, or a model type; and the
    weight source when ``spec`` is a weight file or a safetensors directory (``None`` otherwise)."""
    from transformers import AutoConfig

    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file() and not any(path.glob("*.safetensors")):
        return AutoConfig.from_pretrained(str(path), local_files_only=True), None
    if path.is_file() and path.suffix == ".json":
        values = json.loads(path.read_text())
        return AutoConfig.for_model(values.pop("model_type"), **values), None
    if path.exists():
        from ..weights import open_source  # GGUF and other weight formats

        source = open_source(str(path))
        return source.config(), source
    try:
        return AutoConfig.for_model(spec), None
    except ValueError as exc:
        raise FileNotFoundError(
            f"--model {spec!r} is neither a config directory, a GGUF/weight file, nor a model type known to "
            f"Transformers ({exc})"
        ) from None


def run_check(args) -> int:
    from ..inject import build_meta_model, inject, weight_type_problems
    from ..registry import get_registry
    from ..rule_selection import layered, rule_variant, select_rule_file
    from ..rules import RuleError

    registry = get_registry()
    config, source = model_config(args.model)
    devices = dict(check_devices=not args.any_device, gpu=args.gpu)
    variant = rule_variant(source)
    rule_paths = args.rules or [select_rule_file(config.model_type, registry, args.layout, variant=variant, **devices)]
    ruleset = layered(rule_paths, config.model_type, registry, layout=args.layout, variant=variant, **devices)
    model = build_meta_model(config)
    report = inject(model, ruleset, registry, build_ops=False)
    if source is not None:
        problems = weight_type_problems(model, source, report)
        if problems:
            raise RuleError(problems)
    if args.json:
        print(json.dumps([_json_row(row) for row in report.rows], indent=2))
        return 0
    print(f"model: {type(model).__name__} (model_type {config.model_type})")
    print(f"rules: {', '.join(ruleset.files)}")
    print()
    short = _short_names(ruleset.files)
    for row in report.rows:
        path, _, line = row.rule.rpartition(":")
        row.rule = f"{short.get(path, path)}:{line}"
    print(report.table())
    replaced = sum(1 for r in report.rows if r.wrapper != "default")
    print()
    print(f"{replaced} module(s) replaced by wrappers, {len(report.rows) - replaced} kept (default); "
          f"every other module keeps its Transformers implementation")
    choices = list(dict.fromkeys(line for row in report.rows for line in row.explain))
    if choices:
        print()
        print("backends chosen (op -> plugin on device; the others and why not):")
        print("\n".join(f"  {line}" for line in choices))
    return 0


def _json_row(row) -> dict:
    data = dict(row.__dict__)
    data["class"] = data.pop("module_class")
    return data


def _short_names(paths: list[str]) -> dict[str, str]:
    """Each rule file by its base name where that is unambiguous among ``paths``."""
    names = [Path(p).name for p in paths]
    return {p: (n if names.count(n) == 1 else p) for p, n in zip(paths, names)}


def run_list(args) -> int:
    from ..registry import get_registry
    from ..rule_selection import rule_search_dirs
    from ..rules import RuleError, load_rules

    registry = get_registry()
    found = False
    for directory in rule_search_dirs(registry):
        for path in sorted(Path(directory).glob("*.yaml")):
            if args.model_type and not path.name.startswith(f"{args.model_type}-"):
                continue
            found = True
            try:
                load_rules(path, registry)
                state = "usable here"
            except RuleError as exc:
                state = f"not usable here: {exc.issues[0].message}"
            print(f"{path}  {state}")
    if not found:
        print("no shipped rule files found" + (f" for model type {args.model_type!r}" if args.model_type else ""))
    return 0
