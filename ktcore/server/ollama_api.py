"""Ollama-compatible endpoints under ``/api/``: tags, show, ps, version, generate, chat.

Field names and the NDJSON stream follow Ollama's API; durations are nanoseconds. Ollama's sampling
defaults (temperature 0.8, top_k 40, top_p 0.9, repeat_penalty 1.1) apply to options left out.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from typing import Any, ClassVar, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from ktcore import __version__ as ktcore_version

from .common import (
    ServerState,
    StreamThenRelease,
    chat_prompt,
    collect_unless_disconnected,
    raise_for_engine_error,
    require_model,
    rfc3339_now,
    sampling_params,
    state_of,
    submit,
    text_ids,
    text_prompt,
)
from .errors import APIError
from .logprobs import TokenText
from .reply_plan import ReplyPlan, check_logprobs, plan_reply, template_messages
from .schema import Penalty, RepeatPenalty, Seed, StrictRequest, Temperature, ToolDef, TopP, check_fields
from .schema import check_token_ids, stop_strings
from .tool_calls import ToolCall

router = APIRouter()


MAX_STOPS = 16  # Ollama documents no limit; clients send a model's few stop words, FIM tools a dozen
_LOADING = "set when the model is loaded: kt serve's options decide it"


class Options(StrictRequest):
    num_predict: int | None = None
    temperature: Temperature | None = None
    top_k: int | None = Field(default=None, ge=0)
    top_p: TopP | None = None
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: Seed | None = None
    stop: list[str] | str | None = None
    repeat_penalty: RepeatPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    IGNORED: ClassVar = {name: _LOADING for name in (
        "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "vocab_only", "use_mmap", "use_mlock",
        "num_thread", "numa")} | {"num_keep": "the context is never shifted, so nothing needs keeping"}
    UNSUPPORTED: ClassVar = {"typical_p": "not implemented",
                             "tfs_z": "not implemented", "mirostat": "not implemented",
                             "mirostat_tau": "not implemented", "mirostat_eta": "not implemented",
                             "repeat_last_n": "the repeat penalty covers the whole context (-1)",
                             "penalize_newline": "not implemented"}
    NEUTRAL: ClassVar = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat": 0, "repeat_last_n": -1}


class OllamaFunctionCall(StrictRequest):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    IGNORED: ClassVar = {"index": "calls keep their order in the list"}


class OllamaToolCall(StrictRequest):
    id: str | None = None
    function: OllamaFunctionCall


class Message(StrictRequest):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    IGNORED: ClassVar = {"thinking": "an earlier reply's reasoning is not shown to the model"}
    UNSUPPORTED: ClassVar = {"images": "no image input"}


class _Generating(StrictRequest):
    model: str
    stream: bool = True
    options: Options | None = None
    format: Literal["", "json"] | dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    IGNORED: ClassVar = {"keep_alive": "the model stays loaded for the life of the server"}
    UNSUPPORTED: ClassVar = {"think": "no thinking mode", "images": "no image input", "suffix": "no insertion",
                             "template": "the model's own chat template is used", "width": "no image generation",
                             "height": "no image generation", "steps": "no image generation"}


class GenerateRequest(_Generating):
    prompt: str | None = None
    system: str | None = None
    raw: bool = False
    context: list[int] | None = None


class ChatRequest(_Generating):
    messages: list[Message] | None = None
    tools: list[ToolDef] | None = None


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    name: str | None = None


def _params(state: ServerState, req: _Generating, plan: ReplyPlan):
    o = req.options or Options()
    predict = o.num_predict
    if predict is not None and predict < -2:
        raise APIError(400, f"options.num_predict must be -1 (no limit), -2 (fill the context) or >= 0, got {predict}")
    stops = stop_strings(o.stop, most=MAX_STOPS, param="options.stop")
    return sampling_params(
        max_new_tokens=state.engine.max_context if predict is None or predict < 0 else predict,
        temperature=0.8 if o.temperature is None else o.temperature,
        top_k=40 if o.top_k is None else o.top_k,
        top_p=0.9 if o.top_p is None else o.top_p,
        min_p=o.min_p or 0.0,
        repetition_penalty=1.1 if o.repeat_penalty is None else o.repeat_penalty,
        seed=o.seed,
        stop=stops,
        constraint=plan.constraint,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        skip_special_tokens=plan.skip_special_tokens,
    ), {"presence_penalty": o.presence_penalty or 0.0, "frequency_penalty": o.frequency_penalty or 0.0}


def _plan(state: ServerState, req: _Generating, tools: list[dict] | None = None) -> ReplyPlan:
    """Ollama's ``format`` ("json" or a JSON schema) and ``tools`` (always the model's choice: Ollama has no
    tool_choice)."""
    fmt = req.format
    return plan_reply(state.tokenizer, state.engine.vocab_size, state.engine.eos_ids, tools=tools,
                      json_mode=bool(fmt), json_schema=fmt if isinstance(fmt, dict) else None, format_param="format")


def _timings(stats) -> dict:
    return {
        "total_duration": stats.total_ns,
        "load_duration": stats.queue_ns,  # time waiting for a batch slot: the model itself stays loaded
        "prompt_eval_count": stats.prompt_tokens,
        "prompt_eval_duration": stats.prefill_ns,
        "eval_count": stats.completion_tokens,
        "eval_duration": stats.decode_ns,
    }


def _done_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def _details(state: ServerState) -> dict:
    m = state.model
    return {"parent_model": "", "format": "gguf", "family": m.family, "families": [m.family] if m.family else None,
            "parameter_size": m.parameter_size, "quantization_level": m.quantization}


def _ollama_name(state: ServerState) -> str:
    return state.model.name if ":" in state.model.name else f"{state.model.name}:latest"


def _require(state: ServerState, name: str | None) -> None:
    try:
        require_model(state, name)
    except APIError as exc:
        if exc.status == 404:
            raise APIError(404, f"model '{name}' not found") from exc
        raise


async def _no_extra(full_text: str) -> dict:
    return {}


async def _reply(request: Request, handle, head: dict, piece, plan: ReplyPlan, final_extra=_no_extra,
                 token_text: TokenText | None = None):
    """NDJSON stream or one JSON object; ``piece(text, calls)`` is what a chunk carries for ``text`` and the
    tool calls completed with it; ``await final_extra(full_text)`` adds fields to the last object."""

    def logprobs(items) -> dict:
        return {"logprobs": token_text.ollama(items)} if token_text else {}

    async def final_body(final, text: str, calls, full_text: str, items) -> dict:
        return head | {"created_at": rfc3339_now()} | piece(text, calls) | logprobs(items) | {
            "done": True, "done_reason": _done_reason(final.finish_reason)} | _timings(final.stats) | (
            await final_extra(full_text))

    if request.state.ollama_stream:
        async def lines():
            parts, reply, answer = [], plan.stream(), plan.answer_logprobs(token_text)
            try:
                async for event in handle:
                    parts.append(event.text)
                    final = event.finish_reason is not None
                    text, calls = reply.push(event.text, final=final)
                    items = answer.push(event.logprobs, final)
                    if event.finish_reason == "error":
                        yield json.dumps({"error": f"generation failed: {event.error}"}) + "\n"
                    elif event.finish_reason is not None:
                        yield json.dumps(await final_body(event, text, calls, "".join(parts), items),
                                         ensure_ascii=False) + "\n"
                    elif text or calls or items:
                        yield json.dumps(head | {"created_at": rfc3339_now()} | piece(text, calls)
                                         | logprobs(items) | {"done": False}, ensure_ascii=False) + "\n"
            finally:
                handle.cancel()

        return StreamThenRelease(lines(), handle.cancel, media_type="application/x-ndjson")

    result = await collect_unless_disconnected(request, handle)
    if result is None:
        return None
    text, final = result
    raise_for_engine_error(final)
    content, calls = plan.stream().push(text, final=True)
    items = plan.answer_logprobs(token_text).push(final.logprobs, final=True)
    return await final_body(final, content, calls, text, items)


@router.get("/api/version")
async def version():
    return {"version": ktcore_version}


@router.get("/api/tags")
async def tags(request: Request):
    state = state_of(request)
    name = _ollama_name(state)
    return {"models": [{"name": name, "model": name, "modified_at": state.model.modified_at.isoformat(),
                        "size": state.model.size_bytes, "digest": state.model.digest, "details": _details(state)}]}


@router.get("/api/ps")
async def ps(request: Request):
    state = state_of(request)
    name = _ollama_name(state)
    expires = state.started_at + timedelta(days=365 * 100)  # loaded for the life of the server
    return {"models": [{"name": name, "model": name, "size": state.model.size_bytes, "digest": state.model.digest,
                        "details": _details(state), "expires_at": expires.isoformat(),
                        "size_vram": 0, "context_length": state.engine.max_context,
                        "active_requests": state.engine.active_count, "queued_requests": state.engine.queued_count}]}


@router.post("/api/show")
async def show(req: ShowRequest, request: Request):
    state = state_of(request)
    _require(state, req.model or req.name)
    m = state.model
    info: dict[str, Any] = {"general.architecture": m.family, "general.parameter_count": m.parameter_count,
                            f"{m.family}.context_length": state.engine.max_context}
    return {"modelfile": f"FROM {m.path or m.name}\n", "parameters": "", "license": "",
            "template": getattr(state.tokenizer, "chat_template", None) or "{{ .Prompt }}",
            "details": _details(state), "model_info": info, "capabilities": ["completion", "tools"],
            "modified_at": m.modified_at.isoformat()}


async def _token_text(state: ServerState, req: _Generating) -> TokenText | None:
    if not req.logprobs:
        return None
    return await run_in_threadpool(TokenText, state.tokenizer, state.engine.vocab_size, state.engine.eos_ids)


@router.post("/api/generate")
async def generate(req: GenerateRequest, request: Request):
    state = state_of(request)
    _require(state, req.model)
    check_fields(req)
    head = {"model": req.model}
    if not req.prompt:  # Ollama: an empty prompt only loads the model
        return head | {"created_at": rfc3339_now(), "response": "", "done": True, "done_reason": "load"}
    if req.context:
        if len(req.context) >= state.engine.max_context:
            raise APIError(400, f"context: {len(req.context)} tokens, and this model's context holds "
                                f"{state.engine.max_context}")
        check_token_ids(req.context, state.engine.vocab_size, "context")
    if req.raw or getattr(state.tokenizer, "chat_template", None) is None:
        prompt = await text_prompt(state, req.prompt)
    else:
        messages = ([{"role": "system", "content": req.system}] if req.system else [])
        prompt = await chat_prompt(state, messages + [{"role": "user", "content": req.prompt}], param="prompt")
    if req.context:  # a previous reply's context continues the conversation
        prompt = list(req.context) + prompt
    plan = await run_in_threadpool(_plan, state, req)
    if req.raw or getattr(state.tokenizer, "chat_template", None) is None:
        plan = replace(plan, as_written=True)  # the client's own template: its reply is passed on as it is
    check_logprobs(req.logprobs, req.top_logprobs)
    params, penalties = _params(state, req, plan)
    token_text = await _token_text(state, req)
    handle = submit(state, prompt, params, **penalties)
    request.state.ollama_stream = req.stream

    async def context(full_text: str) -> dict:
        return {"context": prompt + await text_ids(state, full_text)}

    return await _reply(request, handle, head, lambda text, calls: {"response": text}, plan, context,
                        token_text=token_text)


def _chat_message(text: str, calls) -> dict:
    message = {"role": "assistant", "content": text}
    return {"message": message | ({"tool_calls": [c.ollama() for c in calls]} if calls else {})}


@router.post("/api/chat")
async def chat(req: ChatRequest, request: Request):
    state = state_of(request)
    _require(state, req.model)
    check_fields(req)
    head = {"model": req.model}
    if not req.messages:
        return head | {"created_at": rfc3339_now(), "message": {"role": "assistant", "content": ""},
                       "done": True, "done_reason": "load"}
    plan = await run_in_threadpool(_plan, state, req, [t.spec() for t in req.tools or []])
    check_logprobs(req.logprobs, req.top_logprobs)
    messages = [{"role": m.role, "content": m.content, "name": m.tool_name,
                 "tool_calls": [ToolCall(c.function.name, json.dumps(c.function.arguments), c.id or f"call_{i}")
                                for i, c in enumerate(m.tool_calls or [])]} for m in req.messages]
    prompt = await chat_prompt(state, template_messages(messages, plan), tools=plan.template_tools)
    params, penalties = _params(state, req, plan)
    token_text = await _token_text(state, req)
    handle = submit(state, prompt, params, **penalties)
    request.state.ollama_stream = req.stream
    return await _reply(request, handle, head, _chat_message, plan, token_text=token_text)
