"""The sampler the server's requests reach (``ktcore.generate.Sampler``) over any settings a request may carry:
it never raises and always returns a token id of the row, one the filters keep. A top_p of 1e-300 (it passes
the API's ``> 0`` check, and compares as 0 in float32) once dropped every candidate and made a 500."""

from __future__ import annotations

import math

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ktcore.generate import Sampler, SamplingParams

FINITE = st.floats(allow_nan=False, allow_infinity=False, width=32)
ROWS = st.one_of(
    st.lists(FINITE, min_size=1, max_size=40),
    st.lists(st.floats(min_value=-30, max_value=30), min_size=1, max_size=40),  # ordinary logits
    st.lists(st.one_of(FINITE, st.just(-math.inf)), min_size=1, max_size=40)  # a grammar's masked tokens
    .filter(lambda row: any(math.isfinite(v) for v in row)),
)
TEMPERATURE = st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=2.0))
TOP_P = st.one_of(st.just(1.0), st.floats(min_value=5e-324, max_value=1.0, exclude_min=False))
MIN_P = st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=1.0))


@settings(max_examples=400, deadline=None)
@given(row=ROWS, temperature=TEMPERATURE, top_p=TOP_P, top_k=st.integers(0, 50), min_p=MIN_P,
       repetition_penalty=st.floats(min_value=0.01, max_value=2.0), seed=st.integers(0, 2**32))
def test_sampler_always_returns_a_kept_token(row, temperature, top_p, top_k, min_p, repetition_penalty, seed):
    logits = torch.tensor(row, dtype=torch.float32)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                            repetition_penalty=repetition_penalty)
    context = torch.tensor([0, len(row) - 1])
    token = Sampler(params)(logits, context)
    assert isinstance(token, int) and 0 <= token < len(row)
    assert math.isfinite(row[token])  # never a masked token
    if top_k == 1 or temperature == 0.0 or top_p < 1e-30 or min_p == 1.0:
        # only a best token (after the repetition penalty, CTRL-style as in Transformers) can come out
        seen = logits[context]
        logits[context] = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        assert logits[token] == logits.max()


def test_no_token_allowed_or_nan_logits_fall_back_to_argmax():
    assert Sampler(SamplingParams(temperature=1.0, seed=0))(torch.tensor([-math.inf, -math.inf])) == 0
    assert 0 <= Sampler(SamplingParams(temperature=1.0, seed=0))(torch.tensor([0.0, math.nan, 1.0])) < 3


def test_min_p_keeps_tokens_within_the_ratio():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(SamplingParams(temperature=1.0, min_p=0.25, seed=0))  # keeps p >= 0.125
    assert {s(logits) for _ in range(300)} == {0, 1, 2}
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)


@pytest.mark.parametrize("top_p", [1e-9, 1e-300, 5e-324])
def test_tiny_top_p_through_both_apis_is_greedy(server, model_name, top_p):
    body = {"model": model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 1}
    r = httpx.post(server.url + "/v1/chat/completions", json=body | {"temperature": 1.0, "top_p": top_p}, timeout=60)
    assert r.status_code == 200, r.text
    greedy = httpx.post(server.url + "/v1/chat/completions", json=body | {"temperature": 0}, timeout=60)
    assert r.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"]
    r = httpx.post(server.url + "/api/chat", json={
        "model": model_name, "messages": body["messages"], "stream": False,
        "options": {"temperature": 1.0, "top_p": top_p, "min_p": 0.5, "num_predict": 4}}, timeout=60)
    assert r.status_code == 200, r.text
