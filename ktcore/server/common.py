"""What every route needs: the served model, prompt building, submitting to the engine, disconnects."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

from fastapi import Request
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


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Messages ``[{"role", "content"}]`` through the model's chat template, assistant turn opened."""
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    if getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, "this model has no chat template; use /v1/completions with a plain prompt",
                       param="messages", code="no_chat_template")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # templates raise on role orders they do not support
        raise APIError(400, f"the model's chat template rejected these messages: {exc}", param="messages") from exc
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_prompt_ids(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer(prompt)["input_ids"])


def submit(state: ServerState, prompt_ids: list[int], params: SamplingParams, **penalties) -> SequenceHandle:
    try:
        return state.engine.submit(prompt_ids, params, **penalties)
    except ContextOverflowError as exc:
        raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from exc
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc
    except RuntimeError as exc:
        raise APIError(503, str(exc)) from exc


def sampling_params(**kwargs) -> SamplingParams:
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
