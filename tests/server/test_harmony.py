"""GPT-OSS's harmony format through the served routes: a tiny llama with harmony's special tokens and a
harmony-style chat template, its logits overridden to spell a scripted reply (an analysis message, then
the final answer or a tool call). The engine does not stop at the analysis message's ``<|end|>``; the
analysis text reaches no answer, streamed or not, OpenAI or Ollama; a call on the commentary channel is a
tool call."""

from __future__ import annotations

import json

import httpx
import pytest

openai = pytest.importorskip("openai", reason="pip install openai")
ollama = pytest.importorskip("ollama", reason="pip install ollama")

from ktcore.engine.core import end_token_ids  # noqa: E402
from ktcore.server.app import create_app  # noqa: E402
from ktcore.server.engine import Engine  # noqa: E402
from ktcore.server.loading import load_for_serving  # noqa: E402
from ktcore.server.runner import ServerThread  # noqa: E402
from ktcore.server.tiny import scripted_harmony_model, tiny_chat_tokenizer, tiny_harmony_tokenizer  # noqa: E402
from ktcore.testing import tiny_model  # noqa: E402

ANALYSIS = "<|channel|>analysis<|message|>SECRET: the user wants weather.<|end|><|start|>assistant"
ANSWER = "It is sunny."
REPLIES = {
    "answer": ANALYSIS + "<|channel|>final<|message|>" + ANSWER + "<|return|>",
    "call": ANALYSIS + '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
            "<|call|>",
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """``(server, model name, script, engine)``: every reply spells ``script["reply"]``."""
    script = {"reply": REPLIES["answer"]}
    model, tokenizer = scripted_harmony_model(script)
    _, _, info = load_for_serving("tiny:llama")
    engine = Engine(model, tokenizer, max_context=2048, max_concurrency=1)
    srv = ServerThread(create_app(engine, tokenizer, info, db_path=tmp_path_factory.mktemp("db") / "a.sqlite3")).start()
    yield srv, info.name, script, engine
    srv.stop()


def test_end_of_message_is_no_end_token_in_a_harmony_vocabulary():
    model = tiny_model("llama", 0)
    tok = tiny_harmony_tokenizer(model.config.vocab_size)
    ids = end_token_ids(model, tok)
    assert tok.convert_tokens_to_ids("<|end|>") not in ids
    assert {tok.convert_tokens_to_ids("<|return|>"), tok.convert_tokens_to_ids("<|call|>")} <= ids
    phi_like = tiny_chat_tokenizer(model.config.vocab_size - 1)  # <|end|> without <|channel|>: Phi-3's end of turn
    phi_like.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|end|>"]})
    assert phi_like.convert_tokens_to_ids("<|end|>") in end_token_ids(model, phi_like)


def test_openai_answer_is_the_final_channel_only(scripted):
    srv, name, script, engine = scripted
    script["reply"] = REPLIES["answer"]
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    for tools in ([], [WEATHER]):
        extra = {"tools": tools} if tools else {}
        r = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=200, **extra)
        assert r.choices[0].message.content == ANSWER and r.choices[0].finish_reason == "stop"
        # it ran on past the analysis message's <|end|> to the final answer's <|return|>
        assert r.usage.completion_tokens == len(engine.tokenizer(REPLIES["answer"], add_special_tokens=False)[
            "input_ids"])
        raw = httpx.post(srv.url + "/v1/chat/completions", json={
            "model": name, "messages": MESSAGES, "max_tokens": 200, "stream": True, **extra}, timeout=60).text
        assert "SECRET" not in raw and "<|" not in raw
        chunks = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == ANSWER


def test_openai_tool_call_from_the_commentary_channel(scripted):
    srv, name, script, _ = scripted
    script["reply"] = REPLIES["call"]
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    r = client.chat.completions.create(model=name, messages=MESSAGES, tools=[WEATHER], max_tokens=200)
    assert r.choices[0].finish_reason == "tool_calls" and not r.choices[0].message.content
    call, = r.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    chunks = list(client.chat.completions.create(model=name, messages=MESSAGES, tools=[WEATHER], max_tokens=200,
                                                 stream=True))
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        (0, "get_weather", {"city": "Paris"})]
    # the call and its result go back through the template and the model answers
    script["reply"] = REPLIES["answer"]
    history = MESSAGES + [r.choices[0].message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    assert client.chat.completions.create(model=name, messages=history, tools=[WEATHER],
                                          max_tokens=200).choices[0].message.content == ANSWER
    # no tools offered: a message to a function is still no answer text
    script["reply"] = REPLIES["call"]
    r = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=200)
    assert r.choices[0].message.content == "" and not r.choices[0].message.tool_calls


def test_ollama_answer_and_tool_call(scripted):
    srv, name, script, _ = scripted
    oc = ollama.Client(host=srv.url)
    script["reply"] = REPLIES["answer"]
    assert oc.chat(model=name, messages=MESSAGES).message.content == ANSWER
    chunks = list(oc.chat(model=name, messages=MESSAGES, stream=True))
    assert "".join(c.message.content for c in chunks) == ANSWER
    assert oc.generate(model=name, prompt="Weather?").response == ANSWER
    assert "".join(c.response for c in oc.generate(model=name, prompt="Weather?", stream=True)) == ANSWER
    raw = oc.generate(model=name, prompt="<|start|>user<|message|>hi<|end|><|start|>assistant", raw=True)
    assert raw.response == REPLIES["answer"].removesuffix("<|return|>")  # a raw prompt's reply is passed on whole
    script["reply"] = REPLIES["call"]
    for r in (oc.chat(model=name, messages=MESSAGES, tools=[WEATHER]),
              *oc.chat(model=name, messages=MESSAGES, tools=[WEATHER], stream=True)):
        assert "SECRET" not in r.message.content
        if r.message.tool_calls:
            assert [(c.function.name, dict(c.function.arguments)) for c in r.message.tool_calls] == [
                ("get_weather", {"city": "Paris"})]
    assert oc.chat(model=name, messages=MESSAGES, tools=[WEATHER]).message.tool_calls


def test_logprobs_are_the_final_channels_tokens_only(scripted):
    """Log-probabilities of the answer's tokens only, streamed or not, OpenAI and Ollama: the analysis message,
    the markers and a call's tokens have none. Each scripted token is the only one not at -1e4: logprob 0."""
    srv, name, script, _ = scripted
    body = {"model": name, "messages": MESSAGES, "logprobs": True, "top_logprobs": 2, "max_tokens": 200}
    script["reply"] = REPLIES["answer"]
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60).json()
    items = r["choices"][0]["logprobs"]["content"]
    assert "".join(i["token"] for i in items) == ANSWER and r["choices"][0]["message"]["content"] == ANSWER
    assert all(abs(i["logprob"]) < 1e-3 and i["top_logprobs"][0]["token"] == i["token"] for i in items)
    raw = httpx.post(srv.url + "/v1/chat/completions", json=body | {"stream": True, "n": 2}, timeout=60).text
    assert "SECRET" not in raw and "<|" not in raw
    chunks = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    for index in (0, 1):
        choice = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(i["token"] for c in choice if c["logprobs"] for i in c["logprobs"]["content"]) == ANSWER
    oc = ollama.Client(host=srv.url)
    for reply in (oc.chat(model=name, messages=MESSAGES, logprobs=True),
                  oc.generate(model=name, prompt="Weather?", logprobs=True)):
        assert "".join(i.token for i in reply.logprobs) == ANSWER
    lines = list(oc.chat(model=name, messages=MESSAGES, logprobs=True, stream=True))
    assert "".join(i.token for c in lines for i in c.logprobs or []) == ANSWER
    # a raw prompt's reply goes out as written: every token's log-probability, markers included
    raw_reply = oc.generate(model=name, prompt="<|start|>user<|message|>hi<|end|><|start|>assistant", raw=True,
                            logprobs=True)
    assert "".join(i.token for i in raw_reply.logprobs) == REPLIES["answer"].removesuffix("<|return|>")
    script["reply"] = REPLIES["call"]
    r = httpx.post(srv.url + "/v1/chat/completions", json=body | {"tools": [WEATHER]}, timeout=60).json()
    assert r["choices"][0]["finish_reason"] == "tool_calls" and r["choices"][0]["logprobs"]["content"] == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # OpenAI deprecated the Assistants API
def test_assistants_run_stores_the_answer_only(scripted):
    srv, name, script, _ = scripted
    script["reply"] = REPLIES["answer"]
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assistant = client.beta.assistants.create(model=name)
    thread = client.beta.threads.create(messages=MESSAGES)
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                   poll_interval_ms=50)
    assert run.status == "completed"
    reply = client.beta.threads.messages.list(thread.id, order="asc").data[-1]
    assert reply.role == "assistant" and reply.content[0].text.value == ANSWER
