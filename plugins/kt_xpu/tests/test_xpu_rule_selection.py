"""With an XPU present, ``load_model(rules=None)`` takes kt-xpu's gpu-cpu rule file: the selector tries the
accelerator layout for any accelerator, and the ops' ``available()`` decide which vendor's file fits."""

from pathlib import Path

import torch

import kt_xpu
from ktcore.inject import select_rule_file
from ktcore.registry import get_registry


def test_an_xpu_machine_gets_the_xpu_rule_file(monkeypatch):
    registry = get_registry()
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    for op in registry.plugins["xpu"].ops:
        monkeypatch.setattr(op, "available", classmethod(lambda cls, device=None: None))
    chosen = select_rule_file("qwen3_moe", registry)
    assert chosen == Path(kt_xpu.__file__).parent / "rule_files" / "qwen3_moe-gpu-cpu.yaml"


def test_without_an_accelerator_the_cpu_layout_is_taken():
    assert select_rule_file("qwen3_moe", get_registry()).name == "qwen3_moe-cpu.yaml"
