"""Ollama-compatible endpoints driven with the official ``ollama`` client."""

from __future__ import annotations

import pytest

ollama = pytest.importorskip("ollama", reason="pip install ollama")

MESSAGES = [{"role": "user", "content": "Tell me a story."}]
GREEDY = {"temperature": 0, "num_predict": 15}
TIMING_FIELDS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                 "eval_duration")


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, timeout=60)


def test_version_tags_show_ps(client, model_name, server):
    import httpx

    assert httpx.get(server.url + "/api/version").json()["version"]
    tags = client.list()
    assert [m.model for m in tags.models] == [f"{model_name}:latest"]
    assert tags.models[0].details.family == "llama"
    shown = client.show(model_name)
    assert shown.details.format == "gguf"
    assert shown.modelinfo["general.architecture"] == "llama"
    assert "<|im_start|>" in shown.template  # the chat template the model applies
    running = client.ps()
    assert [m.model for m in running.models] == [f"{model_name}:latest"]


def test_chat_non_stream_has_counts_and_nanosecond_timings(client, model_name):
    r = client.chat(model=model_name, messages=MESSAGES, stream=False, options=GREEDY)
    assert r.done and r.message.role == "assistant"
    assert r.done_reason in ("stop", "length")
    assert 1 <= r.eval_count <= 15 and (r.done_reason == "length") == (r.eval_count == 15)
    # one token per character, one per special token: ChatML around the message, assistant turn opened
    prompt = "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"
    specials = 2 * len("<|im_start|>") + len("<|im_end|>")
    assert r.prompt_eval_count == len(prompt) - specials + 3
    for name in TIMING_FIELDS:
        assert isinstance(getattr(r, name), int), name
    assert r.total_duration >= r.prompt_eval_duration + r.eval_duration > 0
    assert r.total_duration < 60 * 10**9  # nanoseconds, not something bigger


def test_chat_stream_equals_non_stream_when_greedy(client, model_name):
    full = client.chat(model=model_name, messages=MESSAGES, stream=False, options=GREEDY)
    parts = list(client.chat(model=model_name, messages=MESSAGES, stream=True, options=GREEDY))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == full.message.content
    assert parts[-1].eval_count == full.eval_count


def test_generate_stream_and_not_with_context(client, model_name, tokenizer):
    full = client.generate(model=model_name, prompt="Why is the sky blue?", stream=False, options=GREEDY)
    parts = list(client.generate(model=model_name, prompt="Why is the sky blue?", stream=True, options=GREEDY))
    assert "".join(p.response for p in parts) == full.response
    assert parts[-1].done and parts[-1].eval_count == full.eval_count
    # context: the prompt (through the chat template) followed by the reply's tokens
    assert tokenizer.decode(full.context, skip_special_tokens=False).endswith("assistant\n" + full.response)
    raw = client.generate(model=model_name, prompt="Why", raw=True, stream=False, options=GREEDY)
    assert raw.prompt_eval_count == len(tokenizer("Why")["input_ids"])


def test_options_stop_and_seed(client, model_name):
    text = client.generate(model=model_name, prompt="abc", stream=False, options={"temperature": 0, "num_predict": 30}).response
    assert len(text) >= 8
    cut = client.generate(model=model_name, prompt="abc", stream=False,
                          options={"temperature": 0, "num_predict": 30, "stop": [text[4:6]]})
    assert cut.response == text[: text.index(text[4:6])] and cut.done_reason == "stop"
    sampled = {"temperature": 1.0, "seed": 5, "num_predict": 20}
    a = client.generate(model=model_name, prompt="abc", stream=False, options=sampled).response
    b = client.generate(model=model_name, prompt="abc", stream=False, options=sampled).response
    assert a == b


def test_unknown_model_is_a_404(client):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="no-such-model", messages=MESSAGES, stream=False)
    assert err.value.status_code == 404 and "no-such-model" in err.value.error
