"""Memory estimates, the fit check at load time, the placement planner (``kt rules suggest``) and routing
measurement (``ktcore.placement``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from ktcore import placement
from ktcore.builtin.experts import KExpertsTorch
from ktcore.inject import LoadError, build_meta_model, inject, load_model
from ktcore.placement import (GIB, RESERVE, PlacementError, estimate_memory, kv_cache_bytes, measure_routing,
                              parse_size, suggest_placement)
from ktcore.registry import Registry
from ktcore.rules import load_rules
from ktcore.testing import tiny_model
from ktcore.weights import open_source
from ktcore.weights.gguf_writer import write_gguf
from ktcore.weights.state_dict import StateDictSource

CPU_RULES = r"""
- match: {name: '^model\.layers\.\d+\.mlp\.experts$', class: experts}
  replace: {class: KExperts, device: cpu, kwargs: {op: KExpertsTorch}}
  recursive: false
- match: {name: '^model\.layers\.\d+\.mlp$', class: moe}
  replace: {class: KMoE, device: cpu, kwargs: {hot_experts: [0, 1], gpu_op: KExpertsTorch, gpu_device: cpu}}
"""
MIB = 2**20


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-dsv2-q4k.gguf"
    return write_gguf(tiny_model("deepseek_v2", seed=0), path, "Q4_K")


def test_parse_size():
    assert parse_size("24GiB") == 24 * GIB and parse_size("24G") == 24 * GIB
    assert parse_size("200GB") == 200 * 10**9 and parse_size("512MiB") == 512 * MIB and parse_size(1000) == 1000
    with pytest.raises(ValueError, match="is not a size"):
        parse_size("lots")


def test_kv_cache_bytes_mla_and_heads():
    v2 = tiny_model("deepseek_v2", seed=0).config
    per_layer = v2.kv_lora_rank + v2.qk_rope_head_dim
    assert kv_cache_bytes(v2, 100) == 100 * v2.num_hidden_layers * per_layer * 4
    q3 = tiny_model("qwen3_moe", seed=0).config
    assert kv_cache_bytes(q3, 10, torch.bfloat16) == 10 * q3.num_hidden_layers * 2 * q3.num_key_value_heads * q3.head_dim * 2


def test_estimate_matches_what_loading_allocates(tmp_path):
    hf = tiny_model("qwen3_moe", seed=0)
    rules = tmp_path / "r.yaml"
    rules.write_text(CPU_RULES)
    registry = Registry(entrypoints=False)
    source = StateDictSource(hf)
    meta = build_meta_model(hf.config)
    inject(meta, load_rules(rules, registry), registry)
    usage = estimate_memory(meta, source)
    model, _ = load_model(source, rules, registry=registry, progress=False)
    ops = [m for m in model.modules() if isinstance(m, KExpertsTorch)]
    routed = sum(t.numel() * t.element_size() for op in ops if op.num_experts == hf.config.num_experts
                 for t in (op.gate_up_proj, op.down_proj))
    hot = sum(t.numel() * t.element_size() for op in ops if op.num_experts == 2 for t in (op.gate_up_proj, op.down_proj))
    assert usage.parts["cpu"]["routed experts"] == routed
    assert usage.parts["cpu"]["hot experts"] == hot > 0


def test_load_refuses_a_placement_that_does_not_fit(tmp_path, monkeypatch):
    hf = tiny_model("qwen3_moe", seed=0)
    rules = tmp_path / "r.yaml"
    rules.write_text(CPU_RULES)
    monkeypatch.setattr(placement, "free_memory", lambda device: RESERVE["cpu"] + MIB)
    loads = []
    monkeypatch.setattr(KExpertsTorch, "load", lambda self, weights: loads.append(1))
    with pytest.raises(LoadError, match=r"cpu needs .* but has .* free: short by \d+\.\d MiB") as info:
        load_model(StateDictSource(hf), rules, registry=Registry(entrypoints=False), progress=False)
    assert "routed experts" in str(info.value)
    assert not loads  # refused before any weight was loaded
    model, _ = load_model(StateDictSource(hf), rules, registry=Registry(entrypoints=False), progress=False,
                          check_memory=False)
    assert loads


def test_measure_routing_counts_every_choice():
    hf = tiny_model("mixtral", seed=0)
    ids = torch.randint(3, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    counts = measure_routing(hf, ids)
    assert sorted(counts) == list(range(hf.config.num_hidden_layers))
    assert all(sum(c) == 12 * hf.config.num_experts_per_tok and len(c) == hf.config.num_local_experts
               for c in counts.values())


def plan_for(path, extra_vram, **kwargs):
    return suggest_placement(path, RESERVE["cuda"] + extra_vram, RESERVE["cpu"] + 64 * MIB, context=256, **kwargs)


def test_planner_fills_vram_with_layers_then_fits(tiny_gguf):
    full = plan_for(tiny_gguf, 64 * MIB)
    routed = full.usage.parts["cuda:0"]["routed experts"]
    fixed = full.usage.total("cuda:0") - routed
    plans = [plan_for(tiny_gguf, extra) for extra in (fixed + routed // 4, fixed + routed * 3 // 4, 64 * MIB)]
    assert [p.gpu_layers for p in plans] == [[], [2], [1, 2]]  # tiny deepseek_v2: MoE layers 1 and 2, last first
    for plan in plans:
        assert plan.usage.total("cuda:0") <= plan.budgets["cuda:0"] - RESERVE["cuda"]
        rules = yaml.safe_load(plan.rules_text)
        assert any(r.get("replace", {}).get("class") == "KMoE" for r in rules)
        # the file loads and injects (ops by name: this machine may have no GPU)
        registry = Registry()
        model = build_meta_model(open_source(str(tiny_gguf)).config())
        inject(model, load_rules(_write(plan.rules_text, tiny_gguf), registry, check_devices=False), registry,
               build_ops=False)
        on_gpu = {n for n, m in model.named_modules() if type(m).__name__ == "KExperts" and m.prefill_device.type == "cuda"}
        assert on_gpu == {f"model.layers.{i}.mlp.experts" for i in plan.gpu_layers}


def _write(text, near):
    path = Path(near).with_suffix(".plan.yaml")
    path.write_text(text)
    return path


def test_planner_with_routing_picks_hot_experts(tiny_gguf):
    routing = {1: [50, 0, 0, 3, 0, 0, 0, 9], 2: [0, 7, 0, 0, 0, 40, 0, 0]}
    plain = plan_for(tiny_gguf, 64 * MIB)
    per_layer = plain.usage.parts["cuda:0"]["routed experts"] / 2
    room = plain.usage.total("cuda:0") - plain.usage.parts["cuda:0"]["routed experts"] + per_layer * 3 / 8 + 1024
    plan = plan_for(tiny_gguf, int(room), routing=routing)
    assert plan.hot == {1: [0], 2: [1, 5]}  # the three largest shares of their layer's tokens (0.85, 0.81, 0.15)
    kmoe = [r for r in yaml.safe_load(plan.rules_text) if r["replace"]["class"] == "KMoE"][-1]
    assert kmoe["replace"]["kwargs"]["hot_experts"] == {1: [0], 2: [1, 5]}


def test_planner_n_cpu_moe_shortcut(tiny_gguf):
    plan = plan_for(tiny_gguf, 64 * MIB, cpu_moe_layers=1)
    assert plan.gpu_layers == [2] and plan.hot == {} and plan.streaming  # layer 1 streams for prefill
    assert "gpu_prefill_threshold" in plan.rules_text
    assert plan_for(tiny_gguf, 64 * MIB, cpu_moe_layers=99).gpu_layers == []  # all experts on the CPU
    full = plan_for(tiny_gguf, 64 * MIB).usage  # every layer's experts on the GPU, nothing streamed
    routed = full.parts["cuda:0"]["routed experts"]
    fixed = full.total("cuda:0") - routed
    with pytest.raises(PlacementError, match=r"--n-cpu-moe 0 does not fit: cuda:0 short by"):
        plan_for(tiny_gguf, fixed + routed // 2, cpu_moe_layers=0)


def test_planner_refuses_what_cannot_fit(tiny_gguf):
    with pytest.raises(PlacementError, match=r"dense part alone does not fit the GPU: cuda:0 needs .*\(short by \d"):
        plan_for(tiny_gguf, 0)


def test_cli_suggest_writes_the_rule_file(tiny_gguf, tmp_path, capsys):
    from ktcore.cli import main

    out = tmp_path / "plan.yaml"
    routing = tmp_path / "routing.json"
    routing.write_text(json.dumps({"1": [1, 2, 3, 4, 5, 6, 7, 8], "2": [8, 7, 6, 5, 4, 3, 2, 1]}))
    status = main(["rules", "suggest", str(tiny_gguf), "--vram", f"{(RESERVE['cuda'] + 8 * MIB) / GIB:.4f}GiB",
                   "--ram", "3GiB", "--context", "128", "--routing", str(routing), "-o", str(out)])
    assert status in (0, None)
    printed = capsys.readouterr().out
    assert out.read_text() in printed and "cuda:0:" in printed and "hot_experts" in out.read_text()


# -- CUDA: the planner's files load and fit ----------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_gpu_planner_output_loads_and_fits_three_budgets(tiny_gguf, tmp_path):
    registry = Registry()
    if "KExpertsGPU" not in registry.ops("experts"):
        pytest.skip("kt-cuda (KExpertsGPU) is not installed")
    full = plan_for(tiny_gguf, 64 * MIB).usage  # every layer's experts on the GPU
    routed = full.parts["cuda:0"]["routed experts"]
    fixed = full.total("cuda:0") - routed
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    outputs, placed = [], []
    for extra in (fixed + routed // 4, fixed + routed * 3 // 4, fixed + routed + 4 * MIB):
        plan = plan_for(tiny_gguf, extra)
        placed.append(plan.gpu_layers)
        path = tmp_path / f"plan-{extra}.yaml"
        path.write_text(plan.rules_text)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        model, _ = load_model(str(tiny_gguf), path, registry=registry, progress=False)
        allocated = torch.cuda.memory_allocated() - before
        weights_estimate = plan.usage.total("cuda:0") - plan.usage.parts["cuda:0"].get("KV cache (256 tokens)", 0)
        assert allocated <= plan.budgets["cuda:0"], (extra, allocated)  # the budget the planner was given
        assert allocated <= 1.25 * weights_estimate + 2 * MIB, (extra, allocated, weights_estimate)
        with torch.no_grad():
            outputs.append(model(ids.cuda()).logits.float().cpu())
        del model
    assert placed == [[], [2], [1, 2]]
    for other in outputs[1:]:
        assert float((other - outputs[0]).norm() / outputs[0].norm()) < 5e-2  # the CPU kernel against KExpertsGPU (bfloat16 activations)
