"""The per-step phase profile (``ktcore.engine.step_profile``): which phases a step reports, that they add up to
the step's wall time, that it records nothing when off and changes no token. Structure only, no timing bounds."""

from __future__ import annotations

import math

import pytest

from ktcore.engine.step_profile import PHASES, StepProfile, phase
from ktcore.generate import Generator, SamplingParams
from ktcore.testing import tiny_model

NEW = 6


@pytest.fixture(scope="module")
def gen():
    return Generator(tiny_model("llama"), None, max_context=64)


def _tokens(gen, prompt):
    return list(gen.generate_ids(prompt, SamplingParams(max_new_tokens=NEW, ignore_eos=True)))


def test_profile_reports_phases_that_sum_to_the_step(gen):
    prompt = list(range(3, 15))
    plain = _tokens(gen, prompt)
    profile = StepProfile()
    with profile.active():
        profiled = _tokens(gen, prompt)
    assert profiled == plain
    prefill, decode = profile.rows("prefill"), profile.rows("decode")
    assert len(prefill) == 1 and len(decode) == NEW - 1  # the first token comes out of the prefill step
    for row in prefill + decode:
        assert set(PHASES) | {"wall"} == set(row)
        assert row["model forward"] > 0 and row["sampling"] > 0  # the tiny model runs module by module
        assert row["fused layers"] == row["output head"] == 0
        assert row["engine python"] >= 0 and row["between steps"] >= 0
        assert math.isclose(sum(row[p] for p in PHASES), row["wall"], rel_tol=1e-9)
    assert all(row["between steps"] > 0 for row in [*prefill, *decode][:-1])  # the generator's loop between steps
    text = profile.report("decode")
    assert text.startswith(f"step profile, decode: {NEW - 1} steps")
    for name in ("model forward", "sampling", "engine python", "step wall"):
        assert name in text
    assert "fused layers" not in text  # phases that took no time are left out
    assert profile.report("nothing") == "step profile: no nothing steps"


def test_profile_off_records_nothing(gen):
    profile = StepProfile()
    with profile.active():
        pass
    _tokens(gen, [3, 4, 5])
    with phase("sampling"):
        pass
    assert profile.steps == []


def test_profiles_nest_and_restore():
    outer, inner = StepProfile(), StepProfile()
    with outer.active():
        with inner.active():
            outer.begin_step()  # hooks go to the innermost active profile; outer's own calls still record
            outer.end_step(1, "decode")
        with phase("sampling"):
            pass
    assert len(outer.steps) == 1 and inner.steps == []
