"""OpenAI Assistants API (v2) routes: assistants, threads, messages, runs (streamed as SSE or polled).

``GET /v1/threads`` is an addition (OpenAI has no thread listing); the web UI lists conversations with it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import Field

from ..common import StreamThenRelease, require_model, state_of
from ..errors import APIError, openai_error_body
from ..schema import Metadata, StrictRequest, Temperature, TopP, check_fields
from .store import AssistantsStore

router = APIRouter(prefix="/v1")


_NO_TOOLS = "runs here call no tools: use /v1/chat/completions with tools"


class AssistantBody(StrictRequest):
    model: str
    name: str | None = None
    description: str | None = None
    instructions: str | None = None
    metadata: Metadata | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    UNSUPPORTED: ClassVar = {"tools": _NO_TOOLS, "tool_resources": _NO_TOOLS,
                             "response_format": "use /v1/chat/completions with response_format",
                             "reasoning_effort": "no reasoning settings"}


class AssistantPatch(AssistantBody):
    model: str | None = None


class MessageBody(StrictRequest):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]
    metadata: Metadata | None = None
    UNSUPPORTED: ClassVar = {"attachments": _NO_TOOLS}


class ThreadBody(StrictRequest):
    messages: list[MessageBody] = Field(default_factory=list)
    metadata: Metadata | None = None
    UNSUPPORTED: ClassVar = {"tool_resources": _NO_TOOLS}


class MetadataBody(StrictRequest):
    metadata: Metadata | None = None


class RunBody(StrictRequest):
    assistant_id: str
    model: str | None = None
    instructions: str | None = None
    additional_instructions: str | None = None
    additional_messages: list[MessageBody] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    metadata: Metadata | None = None
    stream: bool = False
    UNSUPPORTED: ClassVar = {"tools": _NO_TOOLS, "tool_choice": _NO_TOOLS, "parallel_tool_calls": _NO_TOOLS,
                             "response_format": "use /v1/chat/completions with response_format",
                             "reasoning_effort": "no reasoning settings", "include": "no run steps",
                             "truncation_strategy": "runs use the whole thread",
                             "max_prompt_tokens": "runs use the whole thread"}


class ThreadAndRunBody(RunBody):
    thread: ThreadBody | None = None


def _store(request: Request) -> AssistantsStore:
    return state_of(request).assistants


def _page(limit: int, order: str, after: str | None, before: str | None) -> dict:
    return {"limit": limit, "order": order, "after": after, "before": before}


# ------------------------------------------------------------------ assistants


@router.post("/assistants")
def create_assistant(body: AssistantBody, request: Request):
    check_fields(body)
    require_model(state_of(request), body.model)
    return _store(request).create_assistant(**body.model_dump(exclude_unset=True))


@router.get("/assistants")
def list_assistants(request: Request, limit: int = 20, order: str = "desc", after: str | None = None,
                    before: str | None = None):
    return _store(request).list_assistants(**_page(limit, order, after, before))


@router.get("/assistants/{assistant_id}")
def get_assistant(assistant_id: str, request: Request):
    return _store(request).get_assistant(assistant_id)


@router.post("/assistants/{assistant_id}")
def modify_assistant(assistant_id: str, body: AssistantPatch, request: Request):
    check_fields(body)
    fields = body.model_dump(exclude_unset=True)
    if "model" in fields:
        require_model(state_of(request), fields["model"])  # null or "" included: an assistant needs a model
    return _store(request).modify_assistant(assistant_id, **fields)


@router.delete("/assistants/{assistant_id}")
def delete_assistant(assistant_id: str, request: Request):
    return _store(request).delete_assistant(assistant_id)


# ------------------------------------------------------------------ threads and messages


@router.post("/threads")
def create_thread(request: Request, body: ThreadBody | None = None):
    body = body or ThreadBody()
    check_fields(body)
    return _store(request).create_thread([m.model_dump() for m in body.messages], body.metadata)


# before "/threads/{thread_id}", which would take "runs" for a thread id
@router.post("/threads/runs")
async def create_thread_and_run(body: ThreadAndRunBody, request: Request):
    check_fields(body)
    thread_body = body.thread or ThreadBody()
    store = _store(request)
    thread = await run_in_threadpool(store.create_thread, [m.model_dump() for m in thread_body.messages],
                                     thread_body.metadata)
    try:
        return await _start(request, thread["id"], body)
    except APIError:  # no run (an unknown assistant or model, say): no thread left behind either
        await run_in_threadpool(store.delete_thread, thread["id"])
        raise


@router.get("/threads")
def list_threads(request: Request, limit: int = 20, order: str = "desc", after: str | None = None,
                 before: str | None = None):
    return _store(request).list_threads(**_page(limit, order, after, before))


@router.get("/threads/{thread_id}")
def get_thread(thread_id: str, request: Request):
    return _store(request).get_thread(thread_id)


@router.post("/threads/{thread_id}")
def modify_thread(thread_id: str, body: MetadataBody, request: Request):
    check_fields(body)
    return _store(request).modify_thread(thread_id, body.metadata)


@router.delete("/threads/{thread_id}")
def delete_thread(thread_id: str, request: Request):
    return _store(request).delete_thread(thread_id)


@router.post("/threads/{thread_id}/messages")
def create_message(thread_id: str, body: MessageBody, request: Request):
    check_fields(body)
    return _store(request).create_message(thread_id, body.role, body.content, body.metadata)


@router.get("/threads/{thread_id}/messages")
def list_messages(thread_id: str, request: Request, limit: int = 20, order: str = "desc", after: str | None = None,
                  before: str | None = None, run_id: str | None = None):
    return _store(request).list_messages(thread_id, run_id=run_id, **_page(limit, order, after, before))


@router.get("/threads/{thread_id}/messages/{message_id}")
def get_message(thread_id: str, message_id: str, request: Request):
    return _store(request).get_message(thread_id, message_id)


@router.post("/threads/{thread_id}/messages/{message_id}")
def modify_message(thread_id: str, message_id: str, body: MetadataBody, request: Request):
    check_fields(body)
    return _store(request).modify_message(thread_id, message_id, body.metadata)


@router.delete("/threads/{thread_id}/messages/{message_id}")
def delete_message(thread_id: str, message_id: str, request: Request):
    return _store(request).delete_message(thread_id, message_id)


# ------------------------------------------------------------------ runs


async def _start(request: Request, thread_id: str, body: RunBody):
    store, state = _store(request), state_of(request)
    check_fields(body)
    fields = body.model_dump(exclude_unset=True, exclude={"stream", "assistant_id", "additional_messages", "thread"})
    if body.additional_messages:
        fields["additional_messages"] = [m.model_dump() for m in body.additional_messages]
    run = await run_in_threadpool(store.create_run, thread_id, body.assistant_id,
                                  lambda name: require_model(state, name), **fields)
    if not body.stream:
        store.start_run_task(state, run["id"])
        return run

    events: asyncio.Queue = asyncio.Queue()

    async def emit(name: str, obj: dict) -> None:
        await events.put((name, obj))

    async def stream():
        task = None
        try:
            yield _event("thread.run.created", run)
            yield _event("thread.run.queued", run)
            task = store.start_run_task(state, run["id"], emit)
            while not (task.done() and events.empty()):
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield _event(*getter.result())
                else:
                    getter.cancel()
            if task.exception() is not None:
                yield _event("error", openai_error_body(APIError(500, f"run failed: {task.exception()}")))
            yield "event: done\ndata: [DONE]\n\n"
        finally:
            stop_generating()

    def stop_generating():
        handle = store.live.get(run["id"])
        if handle is not None:  # the client went away mid-run: stop generating (the web UI's stop button)
            handle.cancel()

    return StreamThenRelease(stream(), stop_generating, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _event(name: str, obj: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n"


@router.post("/threads/{thread_id}/runs")
async def create_run(thread_id: str, body: RunBody, request: Request):
    return await _start(request, thread_id, body)


@router.get("/threads/{thread_id}/runs")
def list_runs(thread_id: str, request: Request, limit: int = 20, order: str = "desc", after: str | None = None,
              before: str | None = None):
    return _store(request).list_runs(thread_id, **_page(limit, order, after, before))


@router.get("/threads/{thread_id}/runs/{run_id}")
def get_run(thread_id: str, run_id: str, request: Request):
    return _store(request).get_run(thread_id, run_id)


@router.post("/threads/{thread_id}/runs/{run_id}/cancel")
def cancel_run(thread_id: str, run_id: str, request: Request):
    return _store(request).cancel_run(thread_id, run_id)
