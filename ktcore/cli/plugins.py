"""``kt plugins``: installed plugins, the backends of ops each registers per role, whether each can run on
this machine, and the plugins that failed the contract (a hook no spec defines, a hook that raised)."""

from __future__ import annotations

import argparse
import json

EPILOG = """\
Each line is one plugin's backend of an op: a rule file names the op (KLinearGPU), the registry picks,
per device, the backend with the highest preference that can run there. For every backend the devices it
serves are checked: is the device present here, and does its own available() accept it (e.g. "this CPU
has no AMX")? A plugin whose hooks do not follow the contract is not loaded and listed under problems.

examples:
  kt plugins            table of plugins and ops
  kt plugins --json     the same as JSON, for scripts

Install more backends with pip (e.g. `pip install kt-cuda`); a third-party backend is any distribution
with an entry point in the group `ktcore`.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plugins",
        help="list installed plugins and their ops, and which can run here",
        description="List the installed ktcore plugins, the ops each registers per role, and for each op "
        "whether it can run on this machine and, if not, why.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)
    return parser


def op_status(backend) -> dict:
    """For the device types the backend serves (for one that serves any: the CPU and the accelerator torch
    has here): where it runs here, which devices are absent (and why), and where it refuses (its reason)."""
    import torch

    from ..registry import accelerator_present, device_missing_reason

    devices = list(backend.devices) or ["cpu"] + ([torch.accelerator.current_accelerator().type]
                                                 if accelerator_present() else [])
    runs_on, absent, refused = [], {}, {}
    for device in devices:
        missing = device_missing_reason(device)
        try:
            reason = backend.problem(torch.device(device))
        except RuntimeError:  # a device type this torch cannot even parse (npu without torch_npu)
            reason = _own_reason(backend.cls, device)
        if missing:
            # the op's own words ("torch_npu is not installed") say more than "no npu device"
            absent[device] = reason or missing
        elif reason:
            refused[device] = reason
        else:
            runs_on.append(device)
    return {"runs_on": runs_on, "absent_devices": absent, "refused": refused}


def _own_reason(op_cls, device: str) -> str | None:
    try:
        return op_cls.available(device)
    except Exception as exc:  # noqa: BLE001 - a plugin's check failing is itself the reason
        return f"available() raised {type(exc).__name__}: {exc}"


def describe(registry) -> dict:
    plugins = []
    for info in registry.plugins.values():
        ops = []
        for b in info.backends:
            ggml = b.cls.ggml_types
            ops.append({"name": b.op, "class": b.cls.name, "role": b.role, "devices": list(b.devices),
                        "preference": b.preference, "ggml_types": sorted(ggml) if ggml is not None else None,
                        "aliases": sorted(a for a, op in info.aliases.items() if op == b.op), **op_status(b)})
        plugins.append({"name": info.name, "distribution": info.distribution,
                        "module": getattr(info.module, "__name__", type(info.module).__name__),
                        "rule_dirs": [str(d) for d in info.rule_dirs], "ops": ops})
    return {"plugins": plugins, "problems": list(registry.problems)}


def render(data: dict) -> str:
    from ..ops import ROLES

    lines = []
    if not data["plugins"]:
        lines.append("no plugins loaded")
    for plugin in data["plugins"]:
        dist = f"  ({plugin['distribution']})" if plugin["distribution"] else ""
        lines.append(f"{plugin['name']}{dist}  [{plugin['module']}]")
        for role in ROLES:
            for op in (o for o in plugin["ops"] if o["role"] == role):
                state = ("runs here on " + ", ".join(op["runs_on"])) if op["runs_on"] else "CANNOT RUN HERE"
                details = [f"not on {d}: {r}" for d, r in op["refused"].items()]
                if op["runs_on"] and op["absent_devices"]:
                    details.append("also for " + ", ".join(op["absent_devices"]) + " (not present)")
                elif op["absent_devices"]:
                    details += [f"not available: {r}" for r in dict.fromkeys(op["absent_devices"].values())]
                if op["ggml_types"]:
                    details.append("takes " + ", ".join(op["ggml_types"]) + " as stored")
                if op["class"] != op["name"]:
                    details.insert(0, f"as {op['class']}")
                if op["preference"]:
                    details.append(f"preference {op['preference']}")
                if op["aliases"]:
                    details.append("also spelled " + ", ".join(op["aliases"]))
                lines.append(f"  {role:<10} {op['name']:<22} {state}" + (f"; {'; '.join(details)}" if details else ""))
        if not plugin["ops"]:
            lines.append("  (registers no ops)")
        for rule_dir in plugin["rule_dirs"]:
            lines.append(f"  rule files: {rule_dir}")
    if data["problems"]:
        lines.append("")
        lines.append("problems:")
        lines.extend(f"  {p}" for p in data["problems"])
    return "\n".join(lines)


def run(args) -> int:
    from ..registry import get_registry

    data = describe(get_registry())
    print(json.dumps(data, indent=2) if args.json else render(data))
    return 0
