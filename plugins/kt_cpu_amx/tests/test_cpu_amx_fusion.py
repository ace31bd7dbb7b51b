"""Declared fusion of linears on one input (kt_cpu_amx.fusion): the core hands each q/k/v and gate/up group
to its ops at inject time; the fused outputs equal the ones each op computes alone, bit for bit, an input
changed in place is recomputed, and a group whose calls do not follow the pattern dissolves (still correct)."""

from __future__ import annotations

import pytest
import torch
from cpu_amx_helpers import float_tensor, random_blocks
from torch import nn

from ktcore.modules import KLinear, declare_sibling_linears
from kt_cpu_amx import fusion
from kt_cpu_amx.ops import KLinearCPU


class CountingRuntime:
    """The op's runtime, counting calls into the kernels."""

    def __init__(self, rt):
        self.rt, self.calls = rt, []
        self.threads = rt.threads

    def linear(self, *args):
        self.calls.append("linear")
        return self.rt.linear(*args)

    def linear_multi(self, *args):
        self.calls.append("linear_multi")
        return self.rt.linear_multi(*args)


def make_ops(sizes=(96, 32, 64), in_f=256, bias=(False, True, False), declare=True):
    ops = []
    for i, (n, b) in enumerate(zip(sizes, bias)):
        op = KLinearCPU(nn.Linear(in_f, n, bias=b, device="meta"))
        weights = {"weight": random_blocks(("Q4_K", "Q8_0", "Q6_K")[i % 3], (n, in_f), seed=i)}
        if b:
            weights["bias"] = float_tensor(torch.randn(n), name="b")
        op.load(weights)
        ops.append(op)
    counter = None
    for op in ops:
        op(torch.zeros(1, in_f))  # resolve the runtime
        counter = counter or CountingRuntime(op._runtime)
        op._runtime = counter
    if declare:
        for op in ops:
            op.declare_siblings(ops)
    return ops, counter


@pytest.fixture(autouse=True)
def fusion_on(monkeypatch):
    monkeypatch.setattr(fusion, "ENABLED", True)


def alone(ops, x):
    """Each op's output computed on its own (a fresh op on the same weights would give the same)."""
    saved = [op._siblings for op in ops]
    try:
        for op in ops:
            op._siblings = None
        return [op(x) for op in ops]
    finally:
        for op, s in zip(ops, saved):
            op._siblings = s


def test_declared_group_runs_as_one_call_with_exact_outputs():
    ops, rt = make_ops()
    assert ops[0]._siblings is ops[1]._siblings is ops[2]._siblings
    steps = [torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    expected = [alone(ops, x) for x in steps]
    rt.calls.clear()
    for x, want in zip(steps, expected):
        got = [op(x) for op in ops]
        for g, e in zip(got, want):
            assert torch.equal(g, e)
    assert rt.calls == ["linear_multi"] * len(steps)


def test_members_in_another_order_are_served_and_exact():
    ops, rt = make_ops()
    x = torch.randn(2, 256)
    want = alone(ops, x)
    rt.calls.clear()
    got = [ops[i](x) for i in (2, 0, 1)]
    assert all(torch.equal(g, want[i]) for g, i in zip(got, (2, 0, 1)))
    assert rt.calls == ["linear_multi"]


def test_changed_input_is_recomputed():
    ops, _ = make_ops(sizes=(96, 32), bias=(False, False))
    x = torch.randn(1, 256)
    ops[0](x)  # fused: ops[1]'s output computed ahead for these values
    x.mul_(2)  # in place: same tensor, other values
    y = ops[1](x)
    fresh = KLinearCPU(nn.Linear(256, 32, bias=False, device="meta"))
    fresh.load({"weight": random_blocks("Q8_0", (32, 256), seed=1)})
    assert torch.equal(y, fresh(x))


def test_group_that_breaks_its_pattern_dissolves_and_stays_correct():
    ops, rt = make_ops()
    for step in range(fusion.MAX_MISSES):
        x = torch.randn(1, 256)
        want = alone(ops, x)
        assert torch.equal(ops[0](x), want[0])  # the others' outputs are computed ahead...
        y = torch.randn(1, 256)
        assert torch.equal(ops[1](y), alone(ops, y)[1])  # ...and wasted: ops[1] reads another input
    assert not ops[0]._siblings.active
    rt.calls.clear()
    x = torch.randn(1, 256)
    want = alone(ops, x)
    rt.calls.clear()
    assert all(torch.equal(op(x), w) for op, w in zip(ops, want))
    assert rt.calls == ["linear"] * 3


def test_prefill_sized_calls_are_not_fused():
    ops, rt = make_ops()
    xp = torch.randn(64, 256)
    want = alone(ops, xp)
    rt.calls.clear()
    assert all(torch.equal(op(xp), w) for op, w in zip(ops, want))
    assert rt.calls == ["linear"] * 3


def test_fuse_off_runs_one_by_one(monkeypatch):
    monkeypatch.setattr(fusion, "ENABLED", False)
    ops, rt = make_ops()
    x = torch.randn(1, 256)
    want = alone(ops, x)
    rt.calls.clear()
    assert all(torch.equal(op(x), w) for op, w in zip(ops, want))
    assert rt.calls == ["linear"] * 3


def test_core_declares_qkv_and_gate_up_groups():
    """inject's hook: the KLinear children q/k/v and gate/up of one parent are handed to their ops."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            for name, n in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32), ("o_proj", 256)):
                setattr(self, name, nn.Linear(256, n, bias=False, device="meta"))
            self.mlp = nn.Module()
            for name, n in (("gate_proj", 64), ("up_proj", 64)):
                setattr(self.mlp, name, nn.Linear(256, n, bias=False, device="meta"))

    block = Block()
    for parent, names in ((block, ("q_proj", "k_proj", "v_proj", "o_proj")), (block.mlp, ("gate_proj", "up_proj"))):
        for name in names:
            setattr(parent, name, KLinear(getattr(parent, name), prefill_op=KLinearCPU, name=name))
    groups = declare_sibling_linears(block)
    assert groups == [("", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))]
    qkv = [getattr(block, n).generate_op for n in ("q_proj", "k_proj", "v_proj")]
    assert qkv[0]._siblings is qkv[2]._siblings and qkv[0]._siblings.ops == qkv
    assert block.o_proj.generate_op._siblings is None
    assert block.mlp.up_proj.generate_op._siblings.ops == [block.mlp.gate_proj.generate_op,
                                                          block.mlp.up_proj.generate_op]


@pytest.mark.parametrize("family", ["llama", "deepseek_v2"])
def test_decode_of_injected_model_is_bit_identical_to_unfused(family, monkeypatch):
    """A tiny model on the shipped cpu rules: inject declares its groups, and decode steps (one token, so
    the fused path) give the same logits bit for bit as with fusion off."""
    from ktcore.rule_selection import RULE_FILES_DIR as RULE_DIR  # the shipped rules/ tree
    from ktcore.generate import Generator, SamplingParams
    from ktcore.inject import load_model
    from ktcore.registry import get_registry
    from ktcore.testing import tiny_model
    from ktcore.weights.state_dict import StateDictSource

    # the module path (whole-layer fusion, test_cpu_amx_fused_decode.py, would take these decode steps)
    monkeypatch.setattr("kt_cpu_amx.decoder.fuse_decoder_layers", lambda *args: "off: this test runs modules")

    def decode_logits(enabled: bool):
        monkeypatch.setattr(fusion, "ENABLED", enabled)
        model, _ = load_model(StateDictSource(tiny_model(family, seed=0)), RULE_DIR / f"{family}-cpu.yaml",
                              registry=get_registry(), progress=False)
        linears = [m for m in model.modules() if isinstance(m, KLinearCPU)]
        counted = {}
        for op in linears:
            op(torch.zeros(1, op.in_features))  # resolve the runtime, then count its calls
            op._runtime = counted.setdefault(id(op._runtime), CountingRuntime(op._runtime))
        for s in {id(op._siblings): op._siblings for op in linears if op._siblings is not None}.values():
            s.weights = None  # plan again on the counting runtimes
        gen = Generator(model, tokenizer=None, max_context=64)
        steps = []
        original = gen.engine.runner.decode  # the engine's decode steps
        gen.engine.runner.decode = lambda tokens, kvs: steps.append(original(tokens, kvs)) or steps[-1]
        list(gen.generate_ids([5, 9, 14, 3, 7], SamplingParams(max_new_tokens=5, ignore_eos=True)))
        groups = {id(op._siblings) for op in linears if op._siblings is not None and op._siblings.active}
        multi = sum(c.calls.count("linear_multi") for c in counted.values())
        return steps, groups, multi, model.config.num_hidden_layers

    fused, groups, multi, layers = decode_logits(True)
    plain, _, plain_multi, _ = decode_logits(False)
    assert len(fused) == 4 and all(torch.equal(a, b) for a, b in zip(fused, plain))
    assert len(groups) == 2 * layers  # q/k/v (or q/kv_a for MLA) and gate/up of each layer's MLP or shared experts
    # one fused call per group and model call: the 5-token prompt is decode-sized (<= DECODE_ROWS) too
    assert multi == len(groups) * (1 + len(fused)) and plain_multi == 0
