"""Assistants, threads, messages and runs in SQLite, in OpenAI's object shapes; runs executed on the engine.

A run reads its thread, puts the assistant's (or the run's) instructions first as the system message,
renders the model's chat template and streams the reply into a new assistant message, which it commits
every ``SAVE_EVERY_S`` while it grows, so a crash loses at most that much of a reply and nothing that was
committed before. Runs that were in progress when the server died are marked failed at the next start.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..common import ServerState, chat_prompt, sampling_params, submit
from ..errors import APIError
from ..reply_plan import plan_reply
from .db import AssistantRow, MessageRow, RunRow, ThreadRow, open_database

log = logging.getLogger("ktcore.server")

SAVE_EVERY_S = 0.5
Emit = Callable[[str, dict], Awaitable[None]]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def _order_key() -> int:
    return time.time_ns()


# ---------------------------------------------------------------------------------------------- shapes


def assistant_obj(a: AssistantRow) -> dict:
    return {"id": a.id, "object": "assistant", "created_at": a.created_at, "name": a.name,
            "description": a.description, "model": a.model, "instructions": a.instructions, "tools": a.tools or [],
            "tool_resources": {}, "metadata": a.meta or {}, "temperature": a.temperature, "top_p": a.top_p,
            "response_format": "auto"}


def thread_obj(t: ThreadRow) -> dict:
    return {"id": t.id, "object": "thread", "created_at": t.created_at, "metadata": t.meta or {},
            "tool_resources": {}}


def message_obj(m: MessageRow) -> dict:
    content = [{"type": "text", "text": {"value": m.content, "annotations": []}}] if m.content or m.role == "user" else []
    return {"id": m.id, "object": "thread.message", "created_at": m.created_at, "thread_id": m.thread_id,
            "status": m.status, "incomplete_details": {"reason": m.incomplete_reason} if m.incomplete_reason else None,
            "completed_at": m.completed_at, "incomplete_at": m.incomplete_at, "role": m.role, "content": content,
            "assistant_id": m.assistant_id, "run_id": m.run_id, "attachments": [], "metadata": m.meta or {}}


def run_obj(r: RunRow) -> dict:
    incomplete = {"reason": "max_completion_tokens"} if r.status == "incomplete" else None
    return {"id": r.id, "object": "thread.run", "created_at": r.created_at, "thread_id": r.thread_id,
            "assistant_id": r.assistant_id, "status": r.status, "required_action": None, "last_error": r.last_error,
            "expires_at": None, "started_at": r.started_at, "cancelled_at": r.cancelled_at, "failed_at": r.failed_at,
            "completed_at": r.completed_at, "incomplete_details": incomplete, "model": r.model,
            "instructions": r.instructions, "tools": [], "metadata": r.meta or {}, "usage": r.usage,
            "temperature": r.temperature, "top_p": r.top_p, "max_prompt_tokens": None,
            "max_completion_tokens": r.max_completion_tokens,
            "truncation_strategy": {"type": "auto", "last_messages": None}, "response_format": "auto",
            "tool_choice": "auto", "parallel_tool_calls": True}


def text_of(content) -> str:
    """Message content as the API accepts it: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise APIError(400, "content: only text parts are supported", param="content")
            text = part.get("text")
            parts.append(text.get("value", "") if isinstance(text, dict) else str(text))
        return "".join(parts)
    raise APIError(400, "content: must be a string or a list of text parts", param="content")


class AssistantsStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.engine = open_database(path)
        self.Session = sessionmaker(self.engine, expire_on_commit=False)
        self.live: dict[str, object] = {}  # run id -> engine handle, while it generates
        self.tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ generic

    def _get(self, s: Session, cls, ident: str, what: str, thread_id: str | None = None):
        row = s.get(cls, ident)
        if row is None or (thread_id is not None and row.thread_id != thread_id):
            raise APIError(404, f"No {what} found with id '{ident}'", code="not_found")
        return row

    def _page(self, s: Session, cls, shape, *filters, limit: int = 20, order: str = "desc",
              after: str | None = None, before: str | None = None) -> dict:
        if not 1 <= limit <= 100:
            raise APIError(400, "limit: must be between 1 and 100", param="limit")
        if order not in ("asc", "desc"):
            raise APIError(400, "order: must be 'asc' or 'desc'", param="order")
        query = select(cls).where(*filters)
        for cursor, forward in ((after, True), (before, False)):
            if cursor:
                row = s.get(cls, cursor)
                if row is None:
                    raise APIError(400, f"no object '{cursor}' to page from", param="after" if forward else "before")
                later = (order == "asc") == forward
                query = query.where(cls.order_key > row.order_key if later else cls.order_key < row.order_key)
        key = cls.order_key.asc() if order == "asc" else cls.order_key.desc()
        rows = list(s.scalars(query.order_by(key).limit(limit + 1)))
        data = [shape(r) for r in rows[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}

    # ------------------------------------------------------------------ assistants

    def create_assistant(self, model: str, **fields) -> dict:
        with self.Session.begin() as s:
            a = AssistantRow(id=new_id("asst"), created_at=now(), order_key=_order_key(), model=model,
                             name=fields.get("name"), description=fields.get("description"),
                             instructions=fields.get("instructions"), tools=fields.get("tools") or [],
                             meta=fields.get("metadata") or {}, temperature=fields.get("temperature"),
                             top_p=fields.get("top_p"))
            s.add(a)
            return assistant_obj(a)

    def get_assistant(self, ident: str) -> dict:
        with self.Session() as s:
            return assistant_obj(self._get(s, AssistantRow, ident, "assistant"))

    def list_assistants(self, **page) -> dict:
        with self.Session() as s:
            return self._page(s, AssistantRow, assistant_obj, **page)

    def modify_assistant(self, ident: str, **fields) -> dict:
        with self.Session.begin() as s:
            a = self._get(s, AssistantRow, ident, "assistant")
            for name in ("model", "name", "description", "instructions", "tools", "temperature", "top_p"):
                if name in fields:
                    setattr(a, name, fields[name])
            if "metadata" in fields:
                a.meta = fields["metadata"] or {}
            return assistant_obj(a)

    def delete_assistant(self, ident: str) -> dict:
        with self.Session.begin() as s:
            s.delete(self._get(s, AssistantRow, ident, "assistant"))
        return {"id": ident, "object": "assistant.deleted", "deleted": True}

    # ------------------------------------------------------------------ threads

    def create_thread(self, messages: list[dict] | None = None, metadata: dict | None = None) -> dict:
        with self.Session.begin() as s:
            t = ThreadRow(id=new_id("thread"), created_at=now(), order_key=_order_key(), meta=metadata or {})
            s.add(t)
            s.flush()  # the thread row first: messages reference it
            for m in messages or []:
                self._add_message(s, t.id, m.get("role", "user"), text_of(m.get("content", "")), m.get("metadata"))
            return thread_obj(t)

    def get_thread(self, ident: str) -> dict:
        with self.Session() as s:
            return thread_obj(self._get(s, ThreadRow, ident, "thread"))

    def list_threads(self, **page) -> dict:
        with self.Session() as s:
            return self._page(s, ThreadRow, thread_obj, **page)

    def modify_thread(self, ident: str, metadata: dict | None) -> dict:
        with self.Session.begin() as s:
            t = self._get(s, ThreadRow, ident, "thread")
            t.meta = metadata or {}
            return thread_obj(t)

    def delete_thread(self, ident: str) -> dict:
        with self.Session.begin() as s:
            self._get(s, ThreadRow, ident, "thread")
            for run_id in s.scalars(select(RunRow.id).where(RunRow.thread_id == ident)):
                handle = self.live.get(run_id)
                if handle is not None:  # its run ends as cancelled, with nothing left to store
                    handle.cancel()
            s.execute(delete(MessageRow).where(MessageRow.thread_id == ident))
            s.execute(delete(RunRow).where(RunRow.thread_id == ident))
            s.execute(delete(ThreadRow).where(ThreadRow.id == ident))
        return {"id": ident, "object": "thread.deleted", "deleted": True}

    # ------------------------------------------------------------------ messages

    def _add_message(self, s: Session, thread_id: str, role: str, content: str, metadata=None, **extra) -> MessageRow:
        if role not in ("user", "assistant"):
            raise APIError(400, f"role: must be 'user' or 'assistant', got '{role}'", param="role")
        m = MessageRow(id=new_id("msg"), thread_id=thread_id, created_at=now(), order_key=_order_key(), role=role,
                       content=content, status=extra.pop("status", "completed"), meta=metadata or {}, **extra)
        if m.status == "completed":
            m.completed_at = m.created_at
        s.add(m)
        return m

    def create_message(self, thread_id: str, role: str, content, metadata: dict | None = None) -> dict:
        with self.Session.begin() as s:
            self._get(s, ThreadRow, thread_id, "thread")
            if self._active_run(s, thread_id) is not None:
                raise APIError(400, f"Can't add messages to {thread_id} while a run is active", code="run_active")
            return message_obj(self._add_message(s, thread_id, role, text_of(content), metadata))

    def list_messages(self, thread_id: str, run_id: str | None = None, **page) -> dict:
        with self.Session() as s:
            self._get(s, ThreadRow, thread_id, "thread")
            filters = [MessageRow.thread_id == thread_id] + ([MessageRow.run_id == run_id] if run_id else [])
            return self._page(s, MessageRow, message_obj, *filters, **page)

    def get_message(self, thread_id: str, ident: str) -> dict:
        with self.Session() as s:
            return message_obj(self._get(s, MessageRow, ident, "message", thread_id))

    def modify_message(self, thread_id: str, ident: str, metadata: dict | None) -> dict:
        with self.Session.begin() as s:
            m = self._get(s, MessageRow, ident, "message", thread_id)
            m.meta = metadata or {}
            return message_obj(m)

    def delete_message(self, thread_id: str, ident: str) -> dict:
        with self.Session.begin() as s:
            s.delete(self._get(s, MessageRow, ident, "message", thread_id))
        return {"id": ident, "object": "thread.message.deleted", "deleted": True}

    # ------------------------------------------------------------------ runs

    @staticmethod
    def _active_run(s: Session, thread_id: str) -> RunRow | None:
        return s.scalars(select(RunRow).where(RunRow.thread_id == thread_id,
                                              RunRow.status.in_(("queued", "in_progress", "cancelling")))).first()

    def create_run(self, thread_id: str, assistant_id: str, check_model: Callable[[str], None], **fields) -> dict:
        """A queued run; ``check_model(name)`` raises when the server does not serve the run's model."""
        with self.Session.begin() as s:
            self._get(s, ThreadRow, thread_id, "thread")
            a = self._get(s, AssistantRow, assistant_id, "assistant")
            check_model(fields.get("model") or a.model)
            if self._active_run(s, thread_id) is not None:
                raise APIError(400, f"Thread {thread_id} already has an active run", code="run_active")
            for m in fields.get("additional_messages") or []:
                self._add_message(s, thread_id, m.get("role", "user"), text_of(m.get("content", "")), m.get("metadata"))
            instructions = fields.get("instructions")
            if instructions is None:
                instructions = a.instructions
            if fields.get("additional_instructions"):
                instructions = "\n\n".join(x for x in (instructions, fields["additional_instructions"]) if x)
            r = RunRow(id=new_id("run"), thread_id=thread_id, assistant_id=a.id, created_at=now(),
                       order_key=_order_key(), status="queued", model=fields.get("model") or a.model,
                       instructions=instructions,
                       temperature=fields.get("temperature", a.temperature), top_p=fields.get("top_p", a.top_p),
                       max_completion_tokens=fields.get("max_completion_tokens"), meta=fields.get("metadata") or {})
            s.add(r)
            return run_obj(r)

    def get_run(self, thread_id: str, ident: str) -> dict:
        with self.Session() as s:
            return run_obj(self._get(s, RunRow, ident, "run", thread_id))

    def list_runs(self, thread_id: str, **page) -> dict:
        with self.Session() as s:
            self._get(s, ThreadRow, thread_id, "thread")
            return self._page(s, RunRow, run_obj, RunRow.thread_id == thread_id, **page)

    def cancel_run(self, thread_id: str, ident: str) -> dict:
        with self.Session.begin() as s:
            r = self._get(s, RunRow, ident, "run", thread_id)
            if r.status not in ("queued", "in_progress"):
                raise APIError(400, f"Cannot cancel run with status '{r.status}'", code="run_not_active")
            handle = self.live.get(ident)
            if handle is not None:
                r.status = "cancelling"
                handle.cancel()
            else:
                r.status, r.cancelled_at = "cancelled", now()
            return run_obj(r)

    def recover_interrupted_runs(self) -> int:
        """Runs left queued or in progress by a server that died: mark them failed, their replies incomplete."""
        with self.Session.begin() as s:
            runs = list(s.scalars(select(RunRow).where(RunRow.status.in_(("queued", "in_progress", "cancelling")))))
            for r in runs:
                r.status, r.failed_at = "failed", now()
                r.last_error = {"code": "server_error", "message": "the server stopped during this run"}
            for m in s.scalars(select(MessageRow).where(MessageRow.status == "in_progress")):
                m.status, m.incomplete_at, m.incomplete_reason = "incomplete", now(), "run_failed"
        if runs:
            log.warning("marked %d interrupted run(s) failed", len(runs))
        return len(runs)

    def start_run_task(self, state: ServerState, run_id: str, emit: Emit | None = None) -> asyncio.Task:
        task = asyncio.ensure_future(self.execute_run(state, run_id, emit))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a run failed", exc_info=task.exception())

    async def stop_runs(self) -> None:
        for handle in list(self.live.values()):
            handle.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)

    async def execute_run(self, state: ServerState, run_id: str, emit: Emit | None = None) -> dict:
        """Generate the run's reply; ``emit(event_name, object)`` streams Assistants events."""

        async def send(name: str, obj: dict) -> None:
            if emit is not None:
                await emit(name, obj)

        with self.Session.begin() as s:
            r = s.get(RunRow, run_id)
            if r is None:  # its thread was deleted before the run started
                return {}
            if r.status == "cancelled":
                await send("thread.run.cancelled", run_obj(r))
                return run_obj(r)
            r.status, r.started_at = "in_progress", now()
            history = list(s.scalars(select(MessageRow).where(MessageRow.thread_id == r.thread_id)
                                     .order_by(MessageRow.order_key)))
            conversation = ([{"role": "system", "content": r.instructions}] if r.instructions else []) + [
                {"role": m.role, "content": m.content} for m in history if m.content]
            run = run_obj(r)
        await send("thread.run.in_progress", run)
        try:
            prompt = await chat_prompt(state, conversation)
            plan = plan_reply(state.tokenizer, state.engine.vocab_size, state.engine.eos_ids)  # no tools: no grammar
            params = sampling_params(
                max_new_tokens=r.max_completion_tokens or state.engine.max_context,
                temperature=1.0 if r.temperature is None else r.temperature,
                top_p=1.0 if r.top_p is None else r.top_p, skip_special_tokens=plan.skip_special_tokens)
            handle = submit(state, prompt, params)
        except APIError as exc:
            return await self._end_run(run, None, "failed", send, error={"code": exc.code or "invalid_prompt",
                                                                         "message": exc.message})
        self.live[run_id] = handle
        try:
            with self.Session.begin() as s:
                m = self._add_message(s, r.thread_id, "assistant", "", status="in_progress",
                                      assistant_id=r.assistant_id, run_id=run_id)
                message_id = m.id
                created = message_obj(m)
        except IntegrityError:  # the thread was deleted meanwhile
            handle.cancel()
            self.live.pop(run_id, None)
            return await self._end_run(run, None, "cancelled", send)
        await send("thread.message.created", created)
        await send("thread.message.in_progress", created)
        parts, last_save, final, reply = [], time.monotonic(), None, plan.stream()
        try:
            async for event in handle:
                text, _ = reply.push(event.text, final=event.finish_reason is not None)
                if text:
                    parts.append(text)
                    await send("thread.message.delta", {
                        "id": message_id, "object": "thread.message.delta",
                        "delta": {"content": [{"index": 0, "type": "text",
                                               "text": {"value": text, "annotations": []}}]}})
                    if time.monotonic() - last_save > SAVE_EVERY_S:
                        self._save_reply(message_id, "".join(parts))
                        last_save = time.monotonic()
                if event.finish_reason is not None:
                    final = event
        finally:
            self.live.pop(run_id, None)
            if final is None:  # the consumer went away mid-stream
                handle.cancel()
        reason = final.finish_reason if final else "cancelled"
        status = {"stop": "completed", "length": "incomplete", "cancelled": "cancelled"}.get(reason, "failed")
        if status == "incomplete" and not r.max_completion_tokens:
            status = "completed"  # only the context ran out, which OpenAI reports as completed
        usage = None
        if final is not None and final.stats is not None:
            usage = {"prompt_tokens": final.stats.prompt_tokens, "completion_tokens": final.stats.completion_tokens,
                     "total_tokens": final.stats.prompt_tokens + final.stats.completion_tokens}
        error = {"code": "server_error", "message": final.error or "generation failed"} if status == "failed" else None
        return await self._end_run(run, (message_id, "".join(parts)), status, send, usage=usage, error=error)

    def _save_reply(self, message_id: str, text: str) -> None:
        with self.Session.begin() as s:
            m = s.get(MessageRow, message_id)
            if m is not None:  # None: the thread was deleted during the run
                m.content = text

    async def _end_run(self, run: dict, reply: tuple[str, str] | None, status: str, send, *, usage=None,
                       error=None) -> dict:
        """Store how the run ended and send its last events. ``run``: the run as it started; when its thread
        was deleted meanwhile, nothing is stored and the run ends as cancelled."""
        message = None
        with self.Session.begin() as s:
            r = s.get(RunRow, run["id"])
            if r is None:
                status, run = "cancelled", run | {"status": "cancelled", "cancelled_at": now()}
            else:
                r.status, r.usage, r.last_error = status, usage, error
                stamp = now()
                if status in ("completed", "incomplete"):
                    r.completed_at = stamp
                elif status == "cancelled":
                    r.cancelled_at = stamp
                else:
                    r.failed_at = stamp
                m = s.get(MessageRow, reply[0]) if reply is not None else None
                if m is not None:  # None: no reply, or the reply was deleted during the run
                    m.content = reply[1]
                    if status == "completed":
                        m.status, m.completed_at = "completed", stamp
                    else:
                        m.status, m.incomplete_at = "incomplete", stamp
                        m.incomplete_reason = {"incomplete": "max_tokens", "cancelled": "run_cancelled"}.get(
                            status, "run_failed")
                    message = message_obj(m)
                run = run_obj(r)
        if message is not None:
            await send("thread.message.completed" if message["status"] == "completed" else "thread.message.incomplete",
                       message)
        await send(f"thread.run.{status}", run)
        return run
