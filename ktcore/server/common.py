"""What every route needs: the served model, prompt building, submitting to the engine, disconnects."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from .engine import ContextOverflowError, Engine, Event, SamplingParams, SequenceHandle
from .errors import APIError


@dataclass
class ModelInfo:
    """What the listing endpoints say about the served model."""

    name: str  # the id clients send as "model"
    path: str = ""
    family: str = ""
    parameter_count: int = 0
    quantization: str = "unknown"
    size_bytes: int = 0
    context_length: int = 0
    modified_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.name}:{self.path}:{self.size_bytes}".encode()).hexdigest()

    @property
    def parameter_size(self) -> str:
        n = self.parameter_count
        for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= scale:
                return f"{n / scale:.1f}{unit}".replace(".0", "")
        return str(n)

    def accepts(self, requested: str | None) -> bool:
        """Ollama clients add a ":latest" tag; accept the bare name and the tagged one."""
        if not requested:
            return False
        return requested in (self.name, f"{self.name}:latest") or requested.removesuffix(":latest") == self.name


@dataclass
class ServerState:
    engine: Engine
    tokenizer: object
    model: ModelInfo
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    assistants: object | None = None  # AssistantsStore when the Assistants API is on
    # the longest token's text: a prompt of more than max_context times this many characters cannot fit; 0 until
    # a prompt of more than max_context characters needs it (token_chars): the vocabulary is not walked at start
    # (Gemma 3's 262k tokens: 0.2 s)
    max_token_chars: int = 0

    def token_chars(self) -> int:
        """``max_token_chars``, found on first use."""
        if not self.max_token_chars:
            self.max_token_chars = max(len(t) for t in self.tokenizer.get_vocab())
        return self.max_token_chars


def state_of(request: Request) -> ServerState:
    return request.app.state.kt


def require_model(state: ServerState, requested: str | None, *, param: str = "model") -> None:
    if not requested:
        raise APIError(400, "you must provide a model parameter", param=param, code="missing_model")
    if not state.model.accepts(requested):
        raise APIError(404, f"The model '{requested}' does not exist; this server serves '{state.model.name}'",
                       param=param, code="model_not_found")


def message_text(content) -> str:
    """OpenAI content is a string or a list of parts; only text parts are understood."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
        if kind not in ("text", "input_text", "output_text"):
            raise APIError(400, f"content parts of type '{kind}' are not supported (text only)", param="messages")
        text = part.get("text") if isinstance(part, dict) else part.text
        parts.append(text if isinstance(text, str) else getattr(text, "value", str(text)))
    return "".join(parts)


ROLES = ("system", "user", "assistant", "tool")


def chat_prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Messages ``[{"role", "content", ...}]`` (and ``tools`` for templates that render them) through the
    model's chat template, assistant turn opened.

    Only the template's own text may hold special tokens: inside a content, ``<|im_start|>system`` is text
    like any other, so a user cannot open a turn of another role. The template is rendered once more with a
    placeholder for each content; the contents are then tokenized as plain text between the template's
    special tokens. Tools and tool calls, which the template renders itself, must not hold special-token
    text."""
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise APIError(400, f"messages[{i}].role: must be one of {', '.join(ROLES)}, got '{m['role']}'",
                           param=f"messages[{i}].role")
    if getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, "this model has no chat template; use /v1/completions with a plain prompt",
                       param="messages", code="no_chat_template")
    structured = json.dumps([tools, [m.get("tool_calls") for m in messages]], ensure_ascii=False)
    if any(t in structured for t in _special_texts(tokenizer)):
        raise APIError(400, "tools or tool calls hold special-token text; remove it", param="tools")
    text = _render(tokenizer, messages, tools)
    spans = _content_spans(tokenizer, messages, text, tools)
    if spans is None:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids, at = [], 0
    for begin, end in spans + [(len(text), len(text))]:
        if begin > at:
            ids += tokenizer(text[at:begin], add_special_tokens=False)["input_ids"]
        if end > begin:
            ids += tokenizer(text[begin:end], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        at = end
    return ids


def _render(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             **({"tools": tools} if tools else {}))
    except Exception as exc:  # templates raise on role orders they do not support
        raise APIError(400, f"the model's chat template rejected these messages: {exc}", param="messages") from exc


def _special_texts(tokenizer) -> list[str]:
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content]


def _content_spans(tokenizer, messages: list[dict], text: str, tools=None) -> list[tuple[int, int]] | None:
    """``(begin, end)`` of every content inside ``text``, in order; ``None`` when no content holds a special
    token's text (tokenizing ``text`` whole is then safe). Refuses the messages when a content holds special-
    token text and the template transforms contents beyond trimming (no way to tell them from the template's
    own text)."""
    specials = _special_texts(tokenizer)
    if not any(t in m["content"] for m in messages for t in specials):
        return None
    nonce = secrets.token_hex(8)
    marks = [f"KTCONTENT{nonce}N{i}END" for i in range(len(messages))]
    skeleton = _render(tokenizer, [m | {"content": mark} for m, mark in zip(messages, marks)], tools)
    pieces = re.split(f"KTCONTENT{nonce}N(\\d+)END", skeleton)
    for transform in (lambda c: c, str.strip):
        out, spans = [pieces[0]], []
        at = len(pieces[0])
        for index, after in zip(pieces[1::2], pieces[2::2]):
            content = transform(messages[int(index)]["content"])
            spans.append((at, at + len(content)))
            out += [content, after]
            at += len(content) + len(after)
        if "".join(out) == text:
            return spans
    raise APIError(400, "a message content holds special-token text and this model's chat template changes "
                        "contents, so it cannot be kept as plain text; remove the special-token text",
                   param="messages")


def check_prompt_chars(state: ServerState, chars: int, param: str) -> None:
    """Refuse, before tokenizing, a prompt that cannot fit whatever its tokens."""
    if chars <= state.engine.max_context:  # under the limit, whatever the longest token (it has one character or more)
        return
    if chars > state.engine.max_context * state.token_chars():
        raise APIError(400, f"the prompt has {chars} characters: more than this model's context of "
                            f"{state.engine.max_context} tokens can hold (a token covers at most "
                            f"{state.max_token_chars} characters)", param=param, code="context_length_exceeded")


async def chat_prompt(state: ServerState, messages: list[dict], param: str = "messages",
                      tools: list[dict] | None = None) -> list[int]:
    """``chat_prompt_ids`` after the length check, on a worker thread (the event loop keeps streaming)."""
    check_prompt_chars(state, sum(len(m["content"]) for m in messages) + len(json.dumps(tools or [])), param)
    return await run_in_threadpool(chat_prompt_ids, state.tokenizer, messages, tools)


async def text_prompt(state: ServerState, prompt: str, param: str = "prompt") -> list[int]:
    """A plain prompt's ids (special-token text parsed: a raw prompt is the client's own template)."""
    check_prompt_chars(state, len(prompt), param)
    return await run_in_threadpool(lambda: list(state.tokenizer(prompt)["input_ids"]))


async def text_ids(state: ServerState, text: str) -> list[int]:
    """Ids of generated text (no special tokens added), off the event loop."""
    return await run_in_threadpool(lambda: list(state.tokenizer(text, add_special_tokens=False)["input_ids"]))


def submit(state: ServerState, prompt_ids: list[int], params: SamplingParams, param: str = "messages",
           **penalties) -> SequenceHandle:
    try:
        return state.engine.submit(prompt_ids, params, **penalties)
    except ContextOverflowError as exc:
        raise APIError(400, str(exc), param=param, code="context_length_exceeded") from exc
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc
    except RuntimeError as exc:
        raise APIError(503, str(exc)) from exc


MIN_TEMPERATURE = 1e-4  # below it sampling is greedy anyway; 1e-300 would overflow the scaled logits


def sampling_params(**kwargs) -> SamplingParams:
    if 0.0 < kwargs.get("temperature", 0.0) < MIN_TEMPERATURE:
        kwargs["temperature"] = 0.0
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc


async def collect_unless_disconnected(request: Request, handle: SequenceHandle) -> tuple[str, Event] | None:
    """The whole reply, or ``None`` (and the sequence cancelled) when the client goes away first."""
    collecting = asyncio.ensure_future(handle.collect())
    try:
        while True:
            done, _ = await asyncio.wait({collecting}, timeout=0.25)
            if done:
                return collecting.result()
            if await request.is_disconnected():
                handle.cancel()
                return None
    finally:
        if not collecting.done():
            handle.cancel()
            collecting.cancel()


async def merged_events(handles: list[SequenceHandle]):
    """``(index, event)`` of several sequences' events as they come, until each has its final event."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index, handle):
        async for event in handle:
            await queue.put((index, event))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        for _ in handles:
            while True:
                index, event = await queue.get()
                yield index, event
                if event.finish_reason is not None:
                    break
    finally:
        for task in tasks:
            task.cancel()


def raise_for_engine_error(final: Event) -> None:
    if final.finish_reason == "error":
        raise APIError(500, f"generation failed: {final.error}", type="server_error")


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def rfc3339_now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class StreamThenRelease(StreamingResponse):
    """A streaming response that calls ``on_close()`` once it ends for any reason, the client's
    disconnect included (an async generator's ``finally`` only runs when it is finalized, which a
    disconnect does not guarantee to do promptly)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
