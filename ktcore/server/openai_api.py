"""OpenAI-compatible endpoints: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from typing import Any, ClassVar, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ConfigDict, Field

from .common import (
    ServerState,
    StreamThenRelease,
    chat_prompt,
    collect_unless_disconnected,
    merged_events,
    message_text,
    raise_for_engine_error,
    require_model,
    sampling_params,
    sse,
    state_of,
    submit,
    text_prompt,
)
from .engine import SamplingParams
from .errors import APIError, openai_error_body
from .logprobs import TokenText
from .reply_plan import ReplyPlan, check_logprobs, plan_reply, template_messages
from .schema import Penalty, Seed, StrictRequest, Temperature, ToolDef, TopP, check_fields, check_token_ids, stop_strings
from .tool_calls import ToolCall

router = APIRouter()


class FunctionCall(StrictRequest):
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ToolCallIn(StrictRequest):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    IGNORED: ClassVar = {"refusal": "an earlier reply's refusal text is not shown to the model"}
    UNSUPPORTED: ClassVar = {"audio": "no audio", "function_call": "the deprecated functions API: use tool_calls"}


class NamedFunction(StrictRequest):
    name: str


class NamedToolChoice(StrictRequest):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(StrictRequest):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = "reply"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the grammar enforces the schema either way


class ResponseFormat(StrictRequest):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(StrictRequest):
    include_usage: bool = False
    IGNORED: ClassVar = {"include_obfuscation": "no padding is added to stream chunks; nothing to hide"}


MAX_N = 128  # OpenAI's bound on choices per request


class _Sampling(StrictRequest):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    IGNORED: ClassVar = {"user": "an end-user id for abuse monitoring", "metadata": "tags of stored completions",
                         "service_tier": "one tier here", "safety_identifier": "an end-user id for abuse monitoring",
                         "prompt_cache_key": "a routing hint for OpenAI's prompt cache",
                         "prompt_cache_retention": "a routing hint for OpenAI's prompt cache"}
    UNSUPPORTED: ClassVar = {"logit_bias": "not implemented", "store": "completions are not stored",
                             "prediction": "no predicted outputs", "audio": "no audio",
                             "reasoning_effort": "no reasoning settings", "verbosity": "no verbosity setting",
                             "web_search_options": "no web search", "functions": "deprecated: use tools",
                             "function_call": "deprecated: use tool_choice", "suffix": "no insertion",
                             "best_of": "one sample per choice"}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    modalities: list[Literal["text"]] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)


def _check(state: ServerState, req: _Sampling) -> None:
    """The checks both routes make before any work: the model, refused fields, and ``stream_options`` only
    with ``stream: true`` (OpenAI refuses it on a reply that is not streamed)."""
    require_model(state, req.model)
    check_fields(req)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options: only allowed with stream: true", param="stream_options")


def _params(state: ServerState, req: _Sampling, max_tokens: int | None, **extra) -> SamplingParams:
    return sampling_params(
        max_new_tokens=max_tokens if max_tokens is not None else state.engine.max_context,
        temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=stop_strings(req.stop, most=4), **extra,
    )


def _usage(prompt_tokens: int, finals) -> dict:
    completion = sum(f.stats.completion_tokens for f in finals)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def _finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_model_card(request)]}


def _model_card(request: Request) -> dict:
    state = state_of(request)
    return {"id": state.model.name, "object": "model", "created": int(state.model.modified_at.timestamp()),
            "owned_by": "ktcore"}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    require_model(state_of(request), model_id)
    return _model_card(request)


def _streaming(events, handles) -> StreamThenRelease:
    """Server-sent events from ``events`` (dicts, then ``[DONE]``); every engine slot is freed however the
    stream ends (a client that went away included)."""

    def release():
        for handle in handles:
            handle.cancel()  # no-op when finished

    async def body():
        try:
            async for chunk in events:
                yield sse(chunk)
            yield sse("[DONE]")
        finally:
            release()

    return StreamThenRelease(body(), release, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _error_chunk(event) -> dict:
    return openai_error_body(APIError(500, f"generation failed: {event.error}", type="server_error"))


def _submit_choices(state: ServerState, prompt: list[int], params: SamplingParams, n: int, param: str,
                    req: _Sampling) -> list:
    """``n`` independent samples of ``prompt``: choice ``i`` samples with ``seed + i`` when a seed is set."""
    handles = []
    try:
        for i in range(n):
            seed = None if params.seed is None else (params.seed + i + 2**63) % 2**64 - 2**63
            handles.append(submit(state, prompt, replace(params, seed=seed), param,
                                  presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty))
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise
    return handles


async def _collect_all(request: Request, handles) -> list | None:
    results = await asyncio.gather(*(collect_unless_disconnected(request, h) for h in handles))
    if any(r is None for r in results):
        for handle in handles:
            handle.cancel()
        return None
    for _, final in results:
        raise_for_engine_error(final)
    return results


def _token_text(state: ServerState) -> TokenText:
    return TokenText(state.tokenizer, state.engine.vocab_size, state.engine.eos_ids)


def _messages(req: ChatCompletionRequest) -> list[dict]:
    out = []
    for m in req.messages:
        calls = [ToolCall(c.function.name, c.function.arguments, c.id or f"call_{i}")
                 for i, c in enumerate(m.tool_calls or [])]
        out.append({"role": "system" if m.role == "developer" else m.role, "content": message_text(m.content),
                    "tool_calls": calls, "tool_call_id": m.tool_call_id, "name": m.name})
    return out


def _reply_plan(state: ServerState, req: ChatCompletionRequest) -> ReplyPlan:
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        choice = choice.function.name
    rf = req.response_format
    if rf is not None and rf.type == "json_schema" and (rf.json_schema is None or rf.json_schema.json_schema is None):
        raise APIError(400, "response_format.json_schema.schema: required for type json_schema",
                       param="response_format.json_schema")
    return plan_reply(
        state.tokenizer, state.engine.vocab_size, state.engine.eos_ids,
        tools=[t.spec() for t in req.tools or []],
        tool_choice=choice or "auto", parallel_tool_calls=req.parallel_tool_calls,
        json_mode=rf is not None and rf.type != "text",
        json_schema=rf.json_schema.json_schema if rf is not None and rf.type == "json_schema" else None)


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    state = state_of(request)
    _check(state, req)
    plan = await run_in_threadpool(_reply_plan, state, req)
    check_logprobs(req.logprobs, req.top_logprobs)
    messages = template_messages(_messages(req), plan)
    prompt = await chat_prompt(state, messages, tools=plan.template_tools)
    token_text = await run_in_threadpool(_token_text, state) if req.logprobs else None
    params = _params(state, req, req.max_completion_tokens or req.max_tokens, constraint=plan.constraint,
                     logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                     skip_special_tokens=plan.skip_special_tokens)
    handles = _submit_choices(state, prompt, params, req.n, "messages", req)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": req.model}

    def logprobs(items):
        return {"content": token_text.openai_chat(items), "refusal": None} if token_text else None

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _streaming(_chat_chunks(handles, head, plan, token_text, logprobs, len(prompt), include_usage),
                          handles)

    results = await _collect_all(request, handles)
    if results is None:
        return None
    choices = []
    for index, (text, final) in enumerate(results):
        content, calls = plan.stream().push(text, final=True)
        items = plan.answer_logprobs(token_text).push(final.logprobs, final=True)
        message = {"role": "assistant", "content": content if content or not calls else None, "refusal": None}
        if calls:
            message["tool_calls"] = [c.openai() for c in calls]
        choices.append({"index": index, "message": message, "logprobs": logprobs(items),
                        "finish_reason": "tool_calls" if calls else _finish_reason(final.finish_reason)})
    return {"id": ident, "object": "chat.completion", "created": created, "model": req.model, "choices": choices,
            "usage": _usage(len(prompt), [final for _, final in results])}


async def _chat_chunks(handles, head: dict, plan: ReplyPlan, token_text, logprobs, prompt_tokens: int,
                       include_usage: bool):
    """Chunks of every choice as its events come: text (held back while a tool call may be starting),
    each tool call once complete, the finish reason; then the usage chunk when asked."""
    streams = [plan.stream() for _ in handles]
    answers = [plan.answer_logprobs(token_text) for _ in handles]  # each choice's answer tokens
    pending = [[] for _ in handles]  # logprobs of tokens whose text is held back
    finals = []

    def chunk(index, delta, finish=None):
        return head | {"choices": [{"index": index, "delta": delta, "finish_reason": finish,
                                    "logprobs": logprobs(pending[index]) if pending[index] else None}]}

    for index in range(len(handles)):
        yield chunk(index, {"role": "assistant", "content": ""})
    async for index, event in merged_events(handles):
        if event.finish_reason == "error":
            yield _error_chunk(event)
            return
        final = event.finish_reason is not None
        pending[index] += answers[index].push(event.logprobs, final)
        stream = streams[index]
        content, calls = stream.push(event.text, final=final)
        delta = {"content": content} if content else {}
        if calls:  # stream.calls already holds them: the first new one is number len(stream.calls) - len(calls)
            delta["tool_calls"] = [c.openai(len(stream.calls) - len(calls) + k) for k, c in enumerate(calls)]
        if delta:
            yield chunk(index, delta)
            pending[index] = []
        if event.finish_reason is not None:
            finals.append(event)
            yield chunk(index, {}, "tool_calls" if stream.calls else _finish_reason(event.finish_reason))
            pending[index] = []
    if include_usage:
        yield head | {"choices": [], "usage": _usage(prompt_tokens, finals)}


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    state = state_of(request)
    _check(state, req)
    if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], int):
        if len(req.prompt) >= state.engine.max_context:
            raise APIError(400, f"the prompt has {len(req.prompt)} tokens and this model's context holds "
                                f"{state.engine.max_context}", param="prompt", code="context_length_exceeded")
        check_token_ids(req.prompt, state.engine.vocab_size, "prompt")
        prompt_ids = list(req.prompt)
        prompt_text = await run_in_threadpool(state.tokenizer.decode, prompt_ids) if req.echo else ""
    else:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, "prompt: exactly one prompt per request is supported", param="prompt")
        prompt_text = prompts[0]
        prompt_ids = await text_prompt(state, prompt_text)
    if not prompt_ids:
        raise APIError(400, "prompt: the prompt is empty", param="prompt")
    if req.echo and req.logprobs is not None:
        raise APIError(400, "logprobs: not available with echo (the prompt's log-probabilities are not computed)",
                       param="logprobs")
    token_text = await run_in_threadpool(_token_text, state) if req.logprobs is not None else None
    params = _params(state, req, req.max_tokens, logprobs=req.logprobs)
    handles = _submit_choices(state, prompt_ids, params, req.n, "prompt", req)
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": ident, "object": "text_completion", "created": created, "model": req.model}
    echo = prompt_text if req.echo else ""

    def choice(index, text, items, offset, finish=None):
        return {"text": text, "index": index, "finish_reason": finish,
                "logprobs": token_text.openai_legacy(items, offset) if token_text else None}

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def chunks():
            offsets, finals = [0] * len(handles), []
            if echo:
                for index in range(len(handles)):
                    yield head | {"choices": [choice(index, echo, [], 0)]}
            async for index, event in merged_events(handles):
                if event.finish_reason == "error":
                    yield _error_chunk(event)
                    return
                if event.text or event.logprobs:
                    yield head | {"choices": [choice(index, event.text, event.logprobs, offsets[index])]}
                    offsets[index] += len(event.text)
                if event.finish_reason is not None:
                    finals.append(event)
                    yield head | {"choices": [choice(index, "", [], offsets[index],
                                                     _finish_reason(event.finish_reason))]}
            if include_usage:
                yield head | {"choices": [], "usage": _usage(len(prompt_ids), finals)}

        return _streaming(chunks(), handles)

    results = await _collect_all(request, handles)
    if results is None:
        return None
    return head | {"choices": [choice(i, echo + text, final.logprobs, 0, _finish_reason(final.finish_reason))
                               for i, (text, final) in enumerate(results)],
                   "usage": _usage(len(prompt_ids), [final for _, final in results])}
