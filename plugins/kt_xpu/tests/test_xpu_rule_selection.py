"""With an XPU present, ``load_model(rules=None)`` takes the shipped gpu-cpu rule file, whose 'gpu' device is
the XPU there, and its linears resolve to kt-xpu's backends: no vendor copy of the file."""

import torch

import ktcore.registry
import ktcore.rules
from ktcore.registry import Registry
from ktcore.rule_selection import RULE_FILES_DIR, select_rule_file
from ktcore.rules import load_rules


def test_an_xpu_machine_gets_the_shared_file_with_xpu_backends(monkeypatch):
    registry = Registry()
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(ktcore.registry, "accelerator_present", lambda: True)  # rule_selection reads it at call time
    monkeypatch.setattr(ktcore.rules, "accelerator_present", lambda: True)
    monkeypatch.setattr(ktcore.rules, "accelerator_type", lambda: "xpu")
    for op in registry.plugins["xpu"].ops:
        monkeypatch.setattr(op, "available", classmethod(lambda cls, device=None: None))
    chosen = select_rule_file("qwen3_moe", registry)
    assert chosen == RULE_FILES_DIR / "qwen3_moe-gpu-cpu.yaml"
    rules = load_rules(chosen, registry)
    linear = next(r for r in rules if r.op_names == ("KLinearGPU", "KLinearGPU"))
    assert linear.device == torch.device("xpu") and linear.options["generate_op"].plugin == "xpu"
    assert "KLinearGPU -> xpu on xpu" in linear.resolutions["generate"].explain()


def test_without_an_accelerator_the_cpu_layout_is_taken():
    assert select_rule_file("qwen3_moe", Registry()).name == "qwen3_moe-cpu.yaml"
