"""Constrained sampling (ktcore/constrained.py through ``Sampler``): every reply follows the grammar whatever
the logits want, an end token comes only where the grammar accepts, sequences sampled side by side keep
their own grammar state, and logprobs are the given logits' log-softmax."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llguidance", reason="pip install llguidance")

from ktcore.constrained import ConstraintError, json_constraint  # noqa: E402
from ktcore.generate import Sampler, SamplingParams  # noqa: E402
from ktcore.server.tiny import tiny_chat_tokenizer  # noqa: E402

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}},
          "required": ["a", "b"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer()


def _sample(samplers, tokenizer, steps=80, eos_bias=50.0, seed=0):
    """Drive samplers side by side (as a batch would) on random logits that favour the end token."""
    g = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    out = [[] for _ in samplers]
    done = [False] * len(samplers)
    for _ in range(steps):
        for i, sampler in enumerate(samplers):
            if done[i]:
                continue
            logits = torch.randn(len(tokenizer), generator=g) * 3
            logits[eos] += eos_bias
            token = sampler(logits)
            done[i] = token == eos
            if not done[i]:
                out[i].append(token)
    assert all(done), "a constrained reply did not end"
    return [tokenizer.decode(ids) for ids in out]


def test_replies_follow_the_schema_and_end_only_when_complete(tokenizer):
    constraint = json_constraint(tokenizer, len(tokenizer), [tokenizer.eos_token_id], SCHEMA)
    samplers = [Sampler(SamplingParams(temperature=1.0, seed=s, constraint=constraint)) for s in range(3)]
    for text in _sample(samplers, tokenizer):
        value = json.loads(text)
        assert set(value) == {"a", "b"} and isinstance(value["a"], int) and isinstance(value["b"], bool)


def test_greedy_and_any_object(tokenizer):
    constraint = json_constraint(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    text, = _sample([Sampler(SamplingParams(temperature=0.0, constraint=constraint))], tokenizer)
    assert isinstance(json.loads(text), dict)


def test_unconstrained_sampler_takes_the_end_token(tokenizer):
    text, = _sample([Sampler(SamplingParams(temperature=1.0, seed=0))], tokenizer)
    assert text == ""


def test_bad_schema_names_the_problem(tokenizer):
    with pytest.raises(ConstraintError, match="no-such-type"):
        json_constraint(tokenizer, len(tokenizer), [2], {"type": "no-such-type"})


def test_logprobs_are_the_log_softmax_of_the_given_logits():
    logits = torch.randn(64, generator=torch.Generator().manual_seed(1))
    sampler = Sampler(SamplingParams(temperature=0.7, seed=3, top_k=5, logprobs=3))
    token = sampler(logits)
    reference = logits.log_softmax(-1)
    record = sampler.last_logprobs
    assert record.token_id == token and record.logprob == pytest.approx(float(reference[token]))
    best = torch.topk(reference, 3)
    assert [t for t, _ in record.top] == best.indices.tolist()
    assert [lp for _, lp in record.top] == pytest.approx(best.values.tolist())
    assert torch.exp(reference).sum() == pytest.approx(1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_constrained_sampling_of_cuda_logits(tokenizer):
    constraint = json_constraint(tokenizer, len(tokenizer), [tokenizer.eos_token_id], SCHEMA)
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0, constraint=constraint, logprobs=1))
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = []
    for _ in range(80):
        logits = torch.randn(len(tokenizer), generator=g, device="cuda")
        token = sampler(logits)
        assert sampler.last_logprobs.logprob == pytest.approx(float(logits.float().log_softmax(-1)[token]), abs=1e-5)
        if token == tokenizer.eos_token_id:
            break
        ids.append(token)
    assert set(json.loads(tokenizer.decode(ids))) == {"a", "b"}
