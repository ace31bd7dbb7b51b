"""The shipped rule files (the top-level ``rules/`` tree) parse, resolve and carry the fastest verified
configuration: every file loads with every rule matching a module of its model type, and on the accelerator
layouts every sparse MoE block with shared experts is a ``KMoE`` (its routed experts submitted to the CPU while
the shared experts run on the accelerator: the overlap bench_hybrid.py measures). A block without shared experts
has nothing to overlap; a file may leave it to Transformers (MiniMax-M2: its router takes a correction bias
KMoE's router call does not pass)."""

from __future__ import annotations

import pytest

from ktcore.inject import RULE_FILES_DIR, build_meta_model, inject
from ktcore.modules import module_role
from ktcore.moe import KMoE
from ktcore.registry import Registry
from ktcore.rule_selection import parse_rule_file_name
from ktcore.rules import load_rules
from ktcore.sdk.testing import config_for

SHIPPED = sorted(p for p in RULE_FILES_DIR.glob("*.yaml") if p.name != "backends.yaml")


@pytest.fixture(scope="module")
def registry():
    return Registry(entrypoints=False)  # ktcore's own ops: the shipped files must run on them alone


def layout_of(path) -> tuple[str, str]:
    model_type, _, lay = parse_rule_file_name(path.name)  # a variant (deepseek_v3-fp8-cpu) serves its model type
    return model_type, lay


def test_every_family_ships_a_cpu_and_a_gpu_cpu_file():
    families = {layout_of(p)[0] for p in SHIPPED}
    for family in families:
        assert (RULE_FILES_DIR / f"{family}-cpu.yaml").is_file(), family
        assert (RULE_FILES_DIR / f"{family}-gpu-cpu.yaml").is_file(), family


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_file_resolves_and_accelerator_layouts_overlap_every_shared_expert_block(path, registry):
    model_type, layout = layout_of(path)
    rules = load_rules(path, registry, check_devices=False, gpu="cuda")  # as on a CUDA machine
    model = build_meta_model(config_for(model_type))
    sparse = [name for name, m in model.named_modules() if module_role(m) == "moe"
              and any(hasattr(m, shared) for shared in ("shared_experts", "shared_expert"))]
    inject(model, rules, registry, build_ops=False)  # raises on a rule that matches nothing
    if layout == "cpu":
        return
    plain = [name for name in sparse if not isinstance(model.get_submodule(name), KMoE)]
    assert not plain, f"{path.name}: sparse MoE blocks without KMoE: {plain}"
