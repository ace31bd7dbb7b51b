"""Decode-time fusion of linears on one input (kt_cpu_amx.fusion): the fused outputs equal the ones each op
computes alone, bit for bit, and the group falls apart (still correct) when the calls stop following the
learned pattern."""

from __future__ import annotations

import pytest
import torch
from cpu_amx_helpers import random_blocks
from torch import nn

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


def make_ops(sizes=(96, 32, 64), in_f=256, bias=(False, True, False)):
    ops = []
    for i, (n, b) in enumerate(zip(sizes, bias)):
        op = KLinearCPU(nn.Linear(in_f, n, bias=b, device="meta"))
        weights = {"weight": random_blocks(("Q4_K", "Q8_0", "Q6_K")[i % 3], (n, in_f), seed=i)}
        if b:
            from cpu_amx_helpers import float_tensor

            weights["bias"] = float_tensor(torch.randn(n), name="b")
        op.load(weights)
        ops.append(op)
    counter = None
    for op in ops:
        op(torch.zeros(1, in_f))  # resolve the runtime
        counter = counter or CountingRuntime(op._runtime)
        op._runtime = counter
    fusion.forget()
    return ops, counter


@pytest.fixture(autouse=True)
def fusion_on(monkeypatch):
    monkeypatch.setattr(fusion, "ENABLED", True)
    yield
    fusion.forget()


def test_group_is_learned_and_fused_outputs_are_exact():
    ops, rt = make_ops()
    steps = [torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    alone = [[op(x) for op in ops] for x in steps]  # step 0 here also teaches the group
    assert [s.op for s in ops[0]._fusion.followers] == ops[1:]
    rt.calls.clear()
    for x, expected in zip(steps, alone):
        fusion.forget()
        got = [op(x) for op in ops]
        for g, e in zip(got, expected):
            assert torch.equal(g, e)
    assert rt.calls == ["linear_multi"] * len(steps)


def test_out_of_order_call_dissolves_the_group_and_stays_correct():
    ops, rt = make_ops()
    x = torch.randn(1, 256)
    expected = [op(x) for op in ops]
    fusion.forget()
    first = ops[0](x)  # computes all three ahead
    assert torch.equal(first, expected[0])
    assert torch.equal(ops[2](x), expected[2])  # skips ops[1]: not served from the fused call
    assert all(op._fusion.disabled and not op._fusion.followers for op in ops)
    assert torch.equal(ops[1](x), expected[1])
    assert rt.calls[-2:] == ["linear", "linear"]


def test_changed_input_is_recomputed():
    ops, _ = make_ops(sizes=(96, 32), bias=(False, False))
    x = torch.randn(1, 256)
    [op(x) for op in ops]
    fusion.forget()
    ops[0](x)  # fused: ops[1]'s output computed ahead for these values
    x.mul_(2)  # in place: same tensor, other values
    y = ops[1](x)
    fusion.forget()
    fresh = KLinearCPU(nn.Linear(256, 32, bias=False, device="meta"))
    fresh.load({"weight": random_blocks("Q8_0", (32, 256), seed=1)})
    assert torch.equal(y, fresh(x))


def test_prefill_sized_calls_are_not_fused():
    ops, rt = make_ops()
    x = torch.randn(1, 256)
    [op(x) for op in ops]
    rt.calls.clear()
    xp = torch.randn(64, 256)
    [op(xp) for op in ops]
    assert rt.calls == ["linear"] * 3
