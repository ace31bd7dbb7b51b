"""OpenAI-compatible endpoints: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from .common import (
    ServerState,
    StreamThenRelease,
    chat_prompt,
    collect_unless_disconnected,
    message_text,
    raise_for_engine_error,
    require_model,
    sampling_params,
    sse,
    state_of,
    submit,
    text_prompt,
)
from .errors import APIError, openai_error_body
from .schema import Penalty, Seed, Temperature, TopP, check_token_ids, stop_strings

router = APIRouter()


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (user, logit_bias, ...) are ignored


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Sampling(_Lenient):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False


def _params(state: ServerState, req: _Sampling, max_tokens: int | None):
    if req.n != 1:
        raise APIError(400, "n: only n=1 is supported", param="n")
    return sampling_params(
        max_new_tokens=max_tokens if max_tokens is not None else state.engine.max_context,
        temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=stop_strings(req.stop, most=4),
    )


def _usage(stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens}


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


def _sse_response(handle, head: dict, choice, opening: dict | None, stream_options) -> StreamThenRelease:
    """One request's server-sent events: ``opening`` (a first choice, if any), ``choice(text)`` per text
    delta, ``choice(None)`` with the finish reason, the usage chunk when ``stream_options`` asks, then
    ``[DONE]``. The engine slot is freed however the stream ends (a client that went away included)."""
    include_usage = bool(stream_options and stream_options.include_usage)

    async def events():
        try:
            if opening is not None:
                yield sse(head | {"choices": [opening]})
            async for event in handle:
                if event.text:
                    yield sse(head | {"choices": [choice(event.text)]})
                if event.finish_reason is None:
                    continue
                if event.finish_reason == "error":
                    yield sse(openai_error_body(APIError(500, f"generation failed: {event.error}",
                                                         type="server_error")))
                    break
                yield sse(head | {"choices": [choice(None) | {"finish_reason": _finish_reason(event.finish_reason)}]})
                if include_usage:
                    yield sse(head | {"choices": [], "usage": _usage(event.stats)})
            yield sse("[DONE]")
        finally:
            handle.cancel()  # no-op when finished; frees the slot when the client went away

    return StreamThenRelease(events(), handle.cancel, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    state = state_of(request)
    require_model(state, req.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m.content)}
                for m in req.messages]
    prompt = await chat_prompt(state, messages)
    params = _params(state, req, req.max_completion_tokens or req.max_tokens)
    handle = submit(state, prompt, params, presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": req.model}

    if req.stream:
        def choice(text):
            return {"index": 0, "delta": {"content": text} if text is not None else {}, "logprobs": None,
                    "finish_reason": None}

        opening = choice("") | {"delta": {"role": "assistant", "content": ""}}
        return _sse_response(handle, head, choice, opening, req.stream_options)

    result = await collect_unless_disconnected(request, handle)
    if result is None:
        return None
    text, final = result
    raise_for_engine_error(final)
    return {"id": ident, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": _finish_reason(final.finish_reason)}],
            "usage": _usage(final.stats)}


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    state = state_of(request)
    require_model(state, req.model)
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
    handle = submit(state, prompt_ids, _params(state, req, req.max_tokens), "prompt",
                    presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty)
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": ident, "object": "text_completion", "created": created, "model": req.model}
    echo = prompt_text if req.echo else ""

    if req.stream:
        def choice(text):
            return {"text": text or "", "index": 0, "logprobs": None, "finish_reason": None}

        return _sse_response(handle, head, choice, choice(echo) if echo else None, req.stream_options)

    result = await collect_unless_disconnected(request, handle)
    if result is None:
        return None
    text, final = result
    raise_for_engine_error(final)
    return head | {"choices": [{"text": echo + text, "index": 0, "logprobs": None,
                                "finish_reason": _finish_reason(final.finish_reason)}],
                   "usage": _usage(final.stats)}
