"""Bad input over raw HTTP: right status, right error body, and the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest

API_KEY = "sk-test-secret"  # the key conftest's keyed_server requires


def _openai_error(resp, status):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _still_serving(http, model_name):
    ok = http.post("/v1/chat/completions", json={"model": model_name, "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_malformed_json(http, model_name):
    r = http.post("/v1/chat/completions", content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
    err = _openai_error(r, 400)
    assert err["type"] == "invalid_request_error" and "JSON" in err["message"]
    r = http.post("/api/chat", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    _still_serving(http, model_name)


def test_unknown_model(http, model_name):
    err = _openai_error(http.post("/v1/chat/completions", json={
        "model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}), 404)
    assert err["code"] == "model_not_found" and "gpt-17" in err["message"] and err["param"] == "model"
    err = _openai_error(http.post("/v1/completions", json={"model": "gpt-17", "prompt": "hi"}), 404)
    assert err["code"] == "model_not_found"
    r = http.post("/api/generate", json={"model": "gpt-17", "prompt": "hi"})
    assert r.status_code == 404 and r.json() == {"error": "model 'gpt-17' not found"}
    _still_serving(http, model_name)


def test_negative_and_invalid_sampling_values(http, model_name):
    msgs = [{"role": "user", "content": "hi"}]
    err = _openai_error(http.post("/v1/chat/completions", json={"model": model_name, "messages": msgs,
                                                                 "max_tokens": -5}), 400)
    assert err["param"] == "max_tokens" and err["type"] == "invalid_request_error"
    err = _openai_error(http.post("/v1/chat/completions", json={"model": model_name, "messages": msgs,
                                                                 "temperature": 7}), 400)
    assert err["param"] == "temperature"
    err = _openai_error(http.post("/v1/chat/completions", json={"model": model_name, "messages": msgs, "n": 129}), 400)
    assert err["param"] == "n"
    err = _openai_error(http.post("/v1/chat/completions", json={"model": model_name}), 400)
    assert err["param"] == "messages"
    err = _openai_error(http.post("/v1/chat/completions", json={"model": model_name, "messages": []}), 400)
    assert err["param"] == "messages"
    r = http.post("/api/generate", json={"model": model_name, "prompt": "x", "options": {"num_predict": -9}})
    assert r.status_code == 400 and "num_predict" in r.json()["error"]
    _still_serving(http, model_name)


def test_oversized_prompt(http, model_name, server):
    max_context = server.server.config.app.state.kt.engine.max_context
    long = "a" * (max_context + 10)  # one token per character
    err = _openai_error(http.post("/v1/chat/completions", json={
        "model": model_name, "messages": [{"role": "user", "content": long}]}), 400)
    assert err["code"] == "context_length_exceeded" and str(max_context) in err["message"]
    err = _openai_error(http.post("/v1/completions", json={"model": model_name, "prompt": long}), 400)
    assert err["code"] == "context_length_exceeded"
    r = http.post("/api/chat", json={"model": model_name, "messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400 and str(max_context) in r.json()["error"]
    _still_serving(http, model_name)


def test_the_vocabulary_is_walked_only_for_a_prompt_that_could_overflow():
    from types import SimpleNamespace

    from ktcore.server.common import APIError, ServerState, check_prompt_chars

    class Tokenizer:
        calls = 0

        def get_vocab(self):
            Tokenizer.calls += 1
            return {"a": 0, "abc": 1, "<|end|>": 2}

    state = ServerState(engine=SimpleNamespace(max_context=10), tokenizer=Tokenizer(), model=None)
    check_prompt_chars(state, 10, "prompt")
    assert Tokenizer.calls == 0 and state.max_token_chars == 0
    check_prompt_chars(state, 70, "prompt")  # 10 tokens of 7 characters could hold it
    with pytest.raises(APIError, match="71 characters.*at most 7 characters"):
        check_prompt_chars(state, 71, "prompt")
    assert Tokenizer.calls == 1 and state.max_token_chars == 7


def test_unknown_endpoint_is_an_openai_404(http):
    err = _openai_error(http.get("/v1/nothing-here"), 404)
    assert "/v1/nothing-here" in err["message"]


def test_api_key_required_everywhere_but_health_and_web(keyed_server, model_name):
    with httpx.Client(base_url=keyed_server.url, timeout=60) as http:
        body = {"model": model_name, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        err = _openai_error(http.post("/v1/chat/completions", json=body), 401)
        assert err["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer sk-wrong"}
        err = _openai_error(http.post("/v1/chat/completions", json=body, headers=wrong), 401)
        assert err["code"] == "invalid_api_key"
        assert _openai_error(http.get("/v1/models", headers=wrong), 401)
        r = http.get("/api/tags", headers=wrong)
        assert r.status_code == 401 and "API key" in r.json()["error"]
        assert http.get("/health").status_code == 200
        page = http.get("/web/")
        assert page.status_code == 200 and "<html" in page.text.lower()
        good = {"Authorization": f"Bearer {API_KEY}"}
        assert http.post("/v1/chat/completions", json=body, headers=good).status_code == 200
        assert http.get("/api/tags", headers=good).status_code == 200


def test_api_key_with_official_clients(keyed_server, model_name):
    openai = pytest.importorskip("openai")
    ollama = pytest.importorskip("ollama")
    bad = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in good.models.list().data] == [model_name]
    keyed = ollama.Client(host=keyed_server.url, headers={"Authorization": f"Bearer {API_KEY}"})
    assert keyed.list().models


def test_json_body_without_json_content_type(http, model_name):
    """``curl -d '{...}'`` sends form encoding; Ollama's documented examples rely on it working."""
    body = json.dumps({"model": model_name, "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
    r = http.post("/api/generate", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["done"] is True
    r = http.post("/v1/completions", content=json.dumps({"model": model_name, "prompt": "hi", "max_tokens": 2}))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
