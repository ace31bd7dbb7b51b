"""The shipped gpu-cpu rule files: valid for ktcore's rule checker and matching the modules of tiny
models of each family (meta device, so they run everywhere)."""

import re

import pytest
import yaml
from torch import nn

import kt_cuda.plugin as plugin
from ktcore.inject import build_meta_model, inject
from ktcore.ops import ROLES
from ktcore.registry import Registry
from ktcore.rules import load_rules
from ktcore.testing import tiny_config

FAMILIES = ["qwen3_moe", "deepseek_v2", "deepseek_v3"]


def _rules(family):
    return yaml.safe_load((plugin.RULE_DIR / f"{family}-gpu-cpu.yaml").read_text())


def _op_of(rule):
    kw = rule["replace"].get("kwargs", {})
    return kw.get("op") or kw.get("generate_op")


def _first_match(rules, qualname, module):
    from ktcore.modules import module_role

    for rule in rules:
        m = rule["match"]
        if "name" in m and not re.search(m["name"], qualname):
            continue
        if "class" in m and m["class"] in ROLES and module_role(module) != m["class"]:
            continue
        return rule
    return None


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_linears_get_marlin_and_experts_the_cpu(family):
    rules = _rules(family)
    model = build_meta_model(tiny_config(family))
    linears = experts = 0
    for name, module in model.named_modules():
        rule = _first_match(rules, name, module)
        if isinstance(module, nn.Linear) and name.startswith("model.layers."):
            linears += 1
            expected = "KLinearTorch" if name.endswith("kv_b_proj") else "KLinearMarlin"
            assert rule is not None and _op_of(rule) == expected, name
            assert rule["replace"]["device"] == "cuda"
        if name.endswith("mlp.experts"):
            experts += 1
            assert _op_of(rule) == "KExpertsCPU" and rule["replace"]["device"] == "cpu"
            assert rule["replace"]["kwargs"]["out_device"] == "cuda"
    assert linears > 0 and experts > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_ktcore_accepts_the_file(family):
    registry = Registry()
    if "cuda" not in registry.plugins:
        registry.add_plugin(plugin, "cuda")
    path = plugin.RULE_DIR / f"{family}-gpu-cpu.yaml"
    names = {_op_of(r) for r in _rules(family) if r["replace"]["class"] != "default"}
    known = {n for role in ROLES for n in registry.ops(role)}
    missing = sorted(names - known)
    if missing:
        pytest.skip(f"ops {missing} are not registered here (KExpertsCPU comes from kt-cpu-amx)")
    rules = load_rules(path, registry, check_devices=False)
    report = inject(build_meta_model(tiny_config(family)), rules, registry, build_ops=False)
    ops = {row.module: row.generate_op for row in report.rows}
    assert ops["model.layers.1.self_attn.o_proj"] == "KLinearMarlin"
    assert ops["model.layers.1.mlp.experts"] == "KExpertsCPU"


def test_llama_file_puts_every_linear_on_marlin_and_attention_on_flash_gqa():
    registry = Registry()
    if "cuda" not in registry.plugins:
        registry.add_plugin(plugin, "cuda")
    rules = load_rules(plugin.RULE_DIR / "llama-gpu-cpu.yaml", registry, check_devices=False)
    model = build_meta_model(tiny_config("llama"))
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    report = inject(model, rules, registry, build_ops=False)
    ops = {row.module: row.generate_op for row in report.rows}
    assert linears and all(ops.get(n) == "KLinearMarlin" for n in linears), ops
    assert ops["model.layers.0.self_attn"] == "KAttentionFlashGQA"
