"""OpenAI-compatible endpoints driven with the official ``openai`` client."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

openai = pytest.importorskip("openai", reason="pip install openai")

from ktcore.server.common import chat_prompt_ids  # noqa: E402

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client, model_name):
    assert [m.id for m in client.models.list().data] == [model_name]
    assert client.models.retrieve(model_name).id == model_name


def test_chat_usage_counts_and_length_limit(client, model_name, tokenizer):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert r.usage.prompt_tokens == len(chat_prompt_ids(tokenizer, MESSAGES))
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the tiny model can sample its end token early; otherwise it must stop exactly at max_tokens
    assert (choice.finish_reason == "length") == (r.usage.completion_tokens == 12)


def test_chat_stream_equals_non_stream_when_greedy(client, model_name):
    full = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_seed_reproduces_a_sampled_reply(client, model_name):
    kwargs = dict(model=model_name, messages=MESSAGES, max_tokens=24, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(seed=11, **kwargs).choices[0].message.content
    b = client.chat.completions.create(seed=11, **kwargs).choices[0].message.content
    others = {client.chat.completions.create(seed=s, **kwargs).choices[0].message.content for s in (12, 13, 14)}
    assert a == b
    assert others != {a}  # different seeds do not all give the seed-11 reply


def test_stop_string_cuts_the_reply(client, model_name):
    greedy = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=30, temperature=0)
    text = greedy.choices[0].message.content
    assert len(text) >= 8, "the tiny model ended too early for this test"
    stop = text[5:7]
    cut = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=30, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.index(stop)]


def test_completions_stream_and_not(client, model_name, tokenizer):
    r = client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert r.object == "text_completion"
    assert r.usage.prompt_tokens == len(tokenizer("Once upon a time")["input_ids"])
    assert r.usage.completion_tokens <= 10
    streamed = client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=10, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    echoed = client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=10, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == "Once upon a time" + r.choices[0].text


def test_concurrent_requests_batch_and_match_solo_replies(server, model_name):
    """Greedy replies decoded together in one batch equal the same requests decoded alone."""
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    prompts = [f"Prompt number {i} " + "x" * (7 * i) for i in range(4)]

    async def one(prompt):
        stream = await aclient.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": prompt}], max_tokens=16, temperature=0,
            stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def solo_then_together():
        solo = [await one(p) for p in prompts]
        together = await asyncio.gather(*(one(p) for p in prompts))
        return solo, together

    engine = server.server.config.app.state.kt.engine
    solo, together = asyncio.run(solo_then_together())
    assert together == solo
    assert engine.max_batch_seen >= 2


def test_client_disconnect_frees_its_slot(server, model_name, slowed):
    """A streaming client that goes away mid-reply has its sequence cancelled and its slot freed."""
    state = server.server.config.app.state.kt
    engine = state.engine
    cancelled_before = engine.finish_counts["cancelled"]
    body = {"model": model_name, "messages": MESSAGES, "max_tokens": 400, "stream": True, "temperature": 0}
    with slowed(engine, 0.02):  # ~50 tok/s
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200
                for line in resp.iter_lines():  # up to the first piece of text
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        break
                assert engine.active_count == 1, dict(engine.finish_counts)
        deadline = time.monotonic() + 15
        while engine.active_count and time.monotonic() < deadline:
            time.sleep(0.05)
    assert engine.active_count == 0
    assert engine.finish_counts["cancelled"] == cancelled_before + 1, dict(engine.finish_counts)
    assert httpx.get(server.url + "/health").json()["active"] == 0


def test_non_streaming_client_that_gives_up_frees_its_slot(server, model_name, slowed):
    engine = server.server.config.app.state.kt.engine
    cancelled_before = engine.finish_counts["cancelled"]
    body = {"model": model_name, "messages": MESSAGES, "max_tokens": 400, "temperature": 0}
    with slowed(engine, 0.02):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
        deadline = time.monotonic() + 15
        while engine.active_count and time.monotonic() < deadline:
            time.sleep(0.05)
    assert engine.active_count == 0
    assert engine.finish_counts["cancelled"] == cancelled_before + 1, dict(engine.finish_counts)
