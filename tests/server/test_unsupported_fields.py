"""Every request field this server does not implement is refused with a 400 naming it, on every route and at
every level of the body (OpenAI chat and completions, Ollama generate and chat, the Assistants API), streamed
or not: the list is each request model's ``UNSUPPORTED`` table plus a name no API has, so a field added to a
table is tested without further work."""

from __future__ import annotations

import httpx
import pytest

from ktcore.server import ollama_api, openai_api
from ktcore.server.assistants import routes as assistants

UNKNOWN = "frobnicate"
VALUE = 3  # truthy and no field's neutral value
USER = {"role": "user", "content": "hi"}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def _names(model) -> list[str]:
    return sorted(model.UNSUPPORTED) + [UNKNOWN]


def _at(body: dict, path: tuple, name: str) -> dict:
    """``body`` with field ``name`` set at ``path`` (keys and list indices)."""
    import copy

    body = copy.deepcopy(body)
    node = body
    for key in path:
        node = node[key]
    node[name] = VALUE
    return body


def _param(path: tuple, name: str) -> str:
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else f"{'.' if out else ''}{key}"
    return f"{out}.{name}" if out else name


CHAT = {"messages": [USER], "max_tokens": 2}
CHAT_CALLS = {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                           {"role": "tool", "tool_call_id": "c1", "content": "ok"}], "max_tokens": 2}
OLLAMA_CHAT = {"messages": [USER], "stream": False, "options": {"num_predict": 2}}
OLLAMA_CALLS = {"messages": [USER, {"role": "assistant", "content": "", "tool_calls": [
    {"function": {"name": "f", "arguments": {}}}]}], "stream": False, "options": {"num_predict": 2}}

# (route, body without "model", where in it, the request model whose fields are refused there)
PLACES = [
    ("/v1/chat/completions", CHAT, (), openai_api.ChatCompletionRequest),
    ("/v1/chat/completions", CHAT, ("messages", 0), openai_api.ChatMessage),
    ("/v1/chat/completions", CHAT | {"stream": True, "stream_options": {"include_usage": True}}, ("stream_options",),
     openai_api.StreamOptions),
    ("/v1/chat/completions", CHAT | {"response_format": {"type": "json_object"}}, ("response_format",),
     openai_api.ResponseFormat),
    ("/v1/chat/completions", CHAT | {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}}}}, ("response_format", "json_schema"), None),
    ("/v1/chat/completions", CHAT | {"tools": [TOOL]}, ("tools", 0), openai_api.ToolDef),
    ("/v1/chat/completions", CHAT | {"tools": [TOOL]}, ("tools", 0, "function"), None),
    ("/v1/chat/completions", CHAT | {"tools": [TOOL], "tool_choice": {"type": "function", "function": {
        "name": "f"}}}, ("tool_choice",), None),
    ("/v1/chat/completions", CHAT_CALLS, ("messages", 1, "tool_calls", 0), None),
    ("/v1/chat/completions", CHAT_CALLS, ("messages", 1, "tool_calls", 0, "function"), None),
    ("/v1/completions", {"prompt": "a", "max_tokens": 2}, (), openai_api.CompletionRequest),
    ("/api/generate", {"prompt": "a", "stream": False, "options": {"num_predict": 2}}, (), ollama_api.GenerateRequest),
    ("/api/generate", {"prompt": "a", "stream": False, "options": {"num_predict": 2}}, ("options",),
     ollama_api.Options),
    ("/api/chat", OLLAMA_CHAT, (), ollama_api.ChatRequest),
    ("/api/chat", OLLAMA_CHAT, ("options",), ollama_api.Options),
    ("/api/chat", OLLAMA_CHAT, ("messages", 0), ollama_api.Message),
    ("/api/chat", OLLAMA_CHAT | {"tools": [TOOL]}, ("tools", 0, "function"), None),
    ("/api/chat", OLLAMA_CALLS, ("messages", 1, "tool_calls", 0, "function"), ollama_api.OllamaFunctionCall),
    ("/v1/assistants", {}, (), assistants.AssistantBody),
    ("/v1/threads", {"messages": [USER]}, (), assistants.ThreadBody),
    ("/v1/threads", {"messages": [USER]}, ("messages", 0), assistants.MessageBody),
    ("/v1/threads/runs", {"assistant_id": "{assistant}"}, (), assistants.ThreadAndRunBody),
]
CASES = [pytest.param(route, body, path, name, id=f"{route}:{_param(path, name)}")
         for route, body, path, model in PLACES for name in (_names(model) if model else [UNKNOWN])]


def test_the_tables_list_real_fields_only():
    """An UNSUPPORTED name that is also a declared field would never be reached."""
    for *_, model in PLACES:
        if model is not None:
            assert not set(model.UNSUPPORTED) & set(model.model_fields), model


@pytest.fixture(scope="module")
def assistant(server, model_name):
    return httpx.post(server.url + "/v1/assistants", json={"model": model_name}, timeout=30).json()["id"]


@pytest.mark.parametrize("route,body,path,name", CASES)
def test_unsupported_field_is_a_400_naming_it(server, model_name, assistant, route, body, path, name):
    if route.startswith("/v1/threads"):  # a thread names no model
        body = body | ({"assistant_id": assistant} if "assistant_id" in body else {})
    else:
        body = {"model": model_name} | body
    resp = httpx.post(server.url + route, json=_at(body, path, name), timeout=60)
    param = _param(path, name)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    if route.startswith("/api/"):
        assert param in error, error
    else:
        assert error["param"] == param and param in error["message"] and error["code"] == "unsupported_parameter"
    if path == () and name in ("stream", UNKNOWN) or route == "/api/chat":
        # the same body is fine without the field: the 400 is the field's, not the body's
        assert httpx.post(server.url + route, json=body, timeout=60).status_code == 200


@pytest.mark.parametrize("route,body", [("/v1/chat/completions", CHAT | {"stream": True}),
                                        ("/api/chat", OLLAMA_CHAT | {"stream": True})])
def test_streamed_requests_are_refused_before_streaming(server, model_name, route, body):
    resp = httpx.post(server.url + route, json={"model": model_name, UNKNOWN: VALUE} | body, timeout=60)
    assert resp.status_code == 400 and UNKNOWN in resp.text
    assert "json" in resp.headers["content-type"]


@pytest.mark.parametrize("route,body", [("/v1/chat/completions", CHAT), ("/api/chat", OLLAMA_CHAT),
                                        ("/api/generate", {"prompt": "a", "stream": False})])
def test_top_logprobs_without_logprobs_is_a_400_not_ignored(server, model_name, route, body):
    resp = httpx.post(server.url + route, json={"model": model_name, "top_logprobs": 2} | body, timeout=60)
    assert resp.status_code == 400 and "top_logprobs" in resp.text


@pytest.mark.parametrize("route,body", [("/v1/chat/completions", CHAT), ("/v1/completions", {"prompt": "a",
                                                                                             "max_tokens": 2})])
def test_stream_options_without_stream_is_a_400_naming_it(server, model_name, route, body):
    """OpenAI refuses ``stream_options`` on a reply that is not streamed; sent as null it asks nothing."""
    options = {"stream_options": {"include_usage": True}}
    for stream in ({}, {"stream": False}):
        resp = httpx.post(server.url + route, json={"model": model_name} | body | stream | options, timeout=60)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == "stream_options" and "stream_options" in error["message"]
    plain = {"model": model_name} | body | {"stream_options": None}
    assert httpx.post(server.url + route, json=plain, timeout=60).status_code == 200
    streamed = httpx.post(server.url + route, json=plain | {"stream": True} | options, timeout=60)
    assert streamed.status_code == 200 and '"usage"' in streamed.text
