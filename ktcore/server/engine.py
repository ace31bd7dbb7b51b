"""The server's side of the engine (``ktcore.engine``): one thread steps an ``EngineCore`` (continuous batching,
chunked prefill, paged KV cache) while request handlers talk to it through ``submit()``, which returns a
``SequenceHandle``: an async iterator of ``Event``s (text deltas, then one final event with the finish reason
and ``Stats``). Requests join and leave between steps.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

import torch

from ktcore.engine.core import EngineCore
from ktcore.engine.sequence import Sequence
from ktcore.generate import ContextOverflowError, SamplingParams

log = logging.getLogger("ktcore.server")

__all__ = ["Engine", "Event", "SequenceHandle", "Stats", "SamplingParams", "ContextOverflowError"]


@dataclass
class Stats:
    """Counts and wall times of one request, in nanoseconds (Ollama reports them so)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    submitted_ns: int = 0
    queue_ns: int = 0
    prefill_ns: int = 0
    decode_ns: int = 0
    total_ns: int = 0


@dataclass
class Event:
    """A text delta; the last event of a request has ``finish_reason`` ("stop", "length", "cancelled",
    "error") and ``stats``, and ``error`` when the engine failed."""

    text: str = ""
    finish_reason: str | None = None
    stats: Stats | None = None
    error: str | None = None
    logprobs: list = field(default_factory=list)  # TokenLogprob of the tokens since the previous event


class SequenceHandle:
    """The consumer side of one request. Iterate it from the event loop that submitted it."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None):
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.done = False

    def _deliver(self, event: Event) -> None:  # the handle's event loop
        self._queue.put_nowait(event)

    def cancel(self) -> None:
        """Stop generating; the engine frees the slot before its next step."""
        self.cancelled.set()

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        """The next event; text that queued up meanwhile comes merged into one event (a consumer that
        falls behind gets fewer, larger pieces instead of an ever longer backlog)."""
        if self.done:
            raise StopAsyncIteration
        event = await self._queue.get()
        while event.finish_reason is None and not self._queue.empty():
            later = self._queue.get_nowait()
            event = Event(event.text + later.text, later.finish_reason, later.stats, later.error,
                          event.logprobs + later.logprobs)
        if event.finish_reason is not None:
            self.done = True
        return event

    async def collect(self) -> tuple[str, Event]:
        """All text and the final event (carrying every token's logprobs, when they were asked for)."""
        parts, logprobs = [], []
        async for event in self:
            parts.append(event.text)
            logprobs += event.logprobs
            if event.finish_reason is not None:
                event.logprobs = logprobs
                return "".join(parts), event
        raise RuntimeError("the engine ended the stream without a final event")


def _deliver_all(items: list[tuple[SequenceHandle, Event]]) -> None:
    for handle, event in items:
        handle._deliver(event)


class Engine:
    """Continuous batching over ``model`` (a Transformers causal LM) and ``tokenizer`` on a thread.

    ``max_context``: most positions one sequence may use (prompt + reply); ``max_concurrency``: sequences
    decoded together; ``kv_blocks``, ``block_size``, ``cuda_graph``, ``prefix_store``: see ``EngineCore``.
    """

    def __init__(self, model, tokenizer, *, max_context: int | None = None, max_concurrency: int = 8,
                 prefill_chunk: int = 512, kv_blocks: int | None = None, block_size: int | None = None,
                 cuda_graph: bool | None = None, prefix_store=None):
        config_ctx = getattr(model.config, "max_position_embeddings", None) or 4096
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        extra = {"block_size": block_size} if block_size else {}
        self.core = EngineCore(model, tokenizer, max_context=int(max_context or config_ctx),
                               max_concurrency=max_concurrency, prefill_chunk=prefill_chunk, kv_blocks=kv_blocks,
                               cuda_graph=cuda_graph, prefix_store=prefix_store, **extra)
        self.model, self.tokenizer = model, tokenizer
        self.max_context = self.core.max_context
        self.max_concurrency = self.core.max_concurrency
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        self.prefix_store = prefix_store
        self._inbox: list[Sequence] = []
        self._handles: dict[int, tuple[SequenceHandle, Stats]] = {}  # id(seq) -> its handle and stats
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # events of one iteration, handed to the event loops in one call each: a loop wake-up per sequence
        # per token would make the engine thread fight the loop for the GIL
        self._outbox: list[tuple[SequenceHandle, Event]] = []
        self.tokens_generated = 0
        self.finish_counts: Counter[str] = Counter()  # finish reason -> requests

    # ------------------------------------------------------------------ figures for /api/ps and the load test

    @property
    def steps(self) -> int:
        return self.core.steps

    @property
    def max_batch_seen(self) -> int:
        return self.core.max_batch_seen

    @property
    def eos_ids(self) -> set[int]:
        """Token ids that end a reply unless a request ignores them."""
        return self.core.eos_ids

    @property
    def active_count(self) -> int:
        return len(self.core.running)

    @property
    def queued_count(self) -> int:
        return len(self._inbox) + len(self.core.waiting)

    # ------------------------------------------------------------------ public, any thread

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ktcore-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def check_prompt(self, prompt_ids: list[int]) -> None:
        self.core.check_prompt(prompt_ids)

    def submit(self, prompt_ids: list[int], params: SamplingParams, *, presence_penalty: float = 0.0,
               frequency_penalty: float = 0.0, loop: asyncio.AbstractEventLoop | None = None) -> SequenceHandle:
        """Queue a request; call from a coroutine (or pass ``loop``). Raises ``ContextOverflowError`` when
        the prompt does not fit and ``ValueError`` for an empty prompt."""
        seq = self.core.new_sequence(list(prompt_ids), params, presence_penalty=presence_penalty,
                                     frequency_penalty=frequency_penalty)
        handle = SequenceHandle(loop or asyncio.get_running_loop())
        stats = Stats(prompt_tokens=len(seq.prompt_ids), submitted_ns=time.perf_counter_ns())
        with self._wake:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            self._handles[id(seq)] = (handle, stats)
            self._inbox.append(seq)
            self._wake.notify_all()
        return handle

    def together(self):
        """A context in which ``submit`` calls reach the engine thread as one inbox (it takes them in the same
        step): ``with engine.together(): handles = [engine.submit(...) for ...]``."""
        return self._wake  # a Condition over an RLock: submit takes it again inside

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self._inbox and not self.core.has_work:
                        self._wake.wait()
                    if self._stopping:
                        break
                    inbox, self._inbox = self._inbox, []
                for seq in inbox:
                    self.core.add(seq)
                    if seq.finished:  # nothing to generate (no budget)
                        self._report(seq)
                self._drop_cancelled()
                try:
                    for seq in self.core.step():
                        self._report(seq)
                except Exception as exc:  # a failed forward must not take the server down
                    log.error("engine step failed:\n%s", traceback.format_exc())
                    for seq in self.core.abort_all("error", f"{type(exc).__name__}: {exc}"):
                        self._report(seq)
                self._flush()
        for seq in [*self.core.abort_all("error", "the server is shutting down"), *self._inbox]:
            seq.finish_reason = seq.finish_reason or "error"
            seq.error = seq.error or "the server is shutting down"
            self._report(seq)
        self._inbox = []
        self._flush()

    def _drop_cancelled(self) -> None:
        for seq in [*self.core.running, *self.core.waiting]:
            if self._handles[id(seq)][0].cancelled.is_set():
                self.core.finish(seq, "cancelled")
                self._report(seq)

    def _report(self, seq: Sequence) -> None:
        """Hand ``seq``'s new text (and, once it ended, its final event) to its handle."""
        handle, stats = self._handles[id(seq)]
        text = seq.take_text()
        if text:  # log-probabilities go with the text of their tokens (held-back text keeps them back too)
            self._outbox.append((handle, Event(text, logprobs=seq.take_logprobs())))
        if not seq.finished:
            return
        del self._handles[id(seq)]
        now = time.perf_counter_ns()
        stats.completion_tokens = len(seq.generated)
        stats.queue_ns = max(0, seq.admitted_ns - stats.submitted_ns)
        if seq.first_token_ns:
            stats.prefill_ns = seq.first_token_ns - seq.admitted_ns
            stats.decode_ns = seq.last_token_ns - seq.first_token_ns
        stats.total_ns = now - stats.submitted_ns
        self.tokens_generated += len(seq.generated)
        self.finish_counts[seq.finish_reason] += 1
        self._outbox.append((handle, Event(finish_reason=seq.finish_reason, stats=stats, error=seq.error,
                                           logprobs=seq.take_logprobs())))

    def _flush(self) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for handle, event in self._outbox:
            by_loop.setdefault(handle._loop, []).append((handle, event))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:  # that loop is closed: nobody listens to these sequences any more
                for handle, _ in items:
                    handle.cancelled.set()
