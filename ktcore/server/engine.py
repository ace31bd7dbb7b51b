"""The decode engine behind every endpoint: continuous batching over one model.

One engine thread owns the model. Each iteration it admits queued requests (each prefilled alone, up to
``max_concurrency`` live sequences), drops sequences whose client went away, and runs one decode step for
all live sequences together: a single forward over a ``[B, 1]`` batch against a left-padded KV cache
(``KVBatch``). Requests join and leave between steps. Models whose cache cannot be left-padded (sliding
window layers) fall back to one forward per sequence inside the same loop.

Request handlers talk to it through ``submit()``, which returns a ``SequenceHandle``: an async iterator of
``Event``s (text deltas, then one final event with the finish reason and ``Stats``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from ktcore.generate import END_OF_TURN_TOKENS, ContextOverflowError, Sampler, SamplingParams, TextStream, model_device

from .kv_batch import KVBatch, can_batch

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


@dataclass
class _Sequence:
    handle: SequenceHandle
    prompt_ids: list[int]
    params: SamplingParams
    budget: int
    stop_ids: set[int]
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stats: Stats = field(default_factory=Stats)
    sampler: Sampler | None = None
    text: TextStream | None = None
    generated: list[int] = field(default_factory=list)
    unsent: str = ""  # decoded text held back because it may be the start of a stop string
    logprobs: list = field(default_factory=list)  # TokenLogprob not yet sent
    last_token: int = 0
    position: int = 0  # position id of last_token
    cache: DynamicCache | None = None  # only without batching
    finished: bool = False


def _deliver_all(items: list[tuple[SequenceHandle, Event]]) -> None:
    for handle, event in items:
        handle._deliver(event)


def _held_back(text: str, stops: SequenceABC[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    for n in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0


class Engine:
    """Continuous batching over ``model`` (a Transformers causal LM) and ``tokenizer``.

    ``max_context``: most positions one sequence may use (prompt + reply). ``batching``: ``None`` picks
    left-padded batched decode when the model's cache layers allow it and a probe step shows the model
    honours the padding mask; ``False`` forces one forward per sequence.
    """

    def __init__(self, model, tokenizer, *, max_context: int | None = None, max_concurrency: int = 8,
                 prefill_chunk: int = 512, batching: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        config_ctx = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_context = int(max_context or config_ctx)
        self.max_concurrency = int(max_concurrency)
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.prefill_chunk = int(prefill_chunk)
        self.device = model_device(model)
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        self.eos_ids = self._end_token_ids()
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        batchable = can_batch(DynamicCache(config=model.config))
        if batching and not batchable:
            raise ValueError("this model's cache has sliding-window layers; batched decode is not possible")
        self.batched = batchable and (self._batching_matches_solo() if batching is None else bool(batching))
        self._pending: deque[_Sequence] = deque()
        self._active: list[_Sequence] = []
        self._batch = KVBatch()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # events of one iteration, handed to the event loops in one call each: a loop wake-up per sequence
        # per token would make the engine thread fight the loop for the GIL
        self._outbox: list[tuple[SequenceHandle, Event]] = []
        # figures for /api/ps and the load test
        self.steps = 0
        self.tokens_generated = 0
        self.max_batch_seen = 0
        self.finish_counts: Counter[str] = Counter()  # finish reason -> requests

    @torch.inference_mode()
    def _batching_matches_solo(self) -> bool:
        """Probe the model once: one decode step of two left-padded sequences in a batch must give the
        logits of the same steps run alone. Attention ops that ignore the padding mask fail this, and the
        engine then decodes one sequence per forward instead."""
        prompts = [[i % self.vocab_size for i in range(3, 9)], [i % self.vocab_size for i in range(11, 13)]]
        step_token = 7 % self.vocab_size
        solo, batch = [], KVBatch()
        for prompt in prompts:
            ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
            step = torch.tensor([[step_token]], dtype=torch.long, device=self.device)
            alone = DynamicCache(config=self.model.config)
            self._forward(ids, alone)
            solo.append(self._forward(step, alone))
            joined = DynamicCache(config=self.model.config)
            self._forward(ids, joined)
            batch.add(joined, len(prompt))
        batched = self._forward(
            torch.full((2, 1), step_token, dtype=torch.long, device=self.device), batch.cache,
            attention_mask=batch.step_mask(),
            position_ids=torch.tensor([[len(p)] for p in prompts], dtype=torch.long, device=self.device))
        solo = torch.cat(solo)
        error, scale = float((batched - solo).abs().max()), float(solo.abs().max())
        matches = error <= 1e-2 * scale + 1e-3
        if not matches:
            log.warning("batched decode differs from solo decode (max logit error %.3g of %.3g): "
                        "decoding one sequence per forward", error, scale)
        return matches

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

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def queued_count(self) -> int:
        return len(self._pending)

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_ids)} tokens and this model's context holds {self.max_context}; "
                "shorten the prompt"
            )

    def submit(self, prompt_ids: list[int], params: SamplingParams, *, presence_penalty: float = 0.0,
               frequency_penalty: float = 0.0, loop: asyncio.AbstractEventLoop | None = None) -> SequenceHandle:
        """Queue a request; call from a coroutine (or pass ``loop``). Raises ``ContextOverflowError`` when
        the prompt does not fit and ``ValueError`` for an empty prompt."""
        self.check_prompt(prompt_ids)
        handle = SequenceHandle(loop or asyncio.get_running_loop())
        budget = min(params.max_new_tokens, self.max_context - len(prompt_ids))
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        seq = _Sequence(handle, list(prompt_ids), params, budget, stop_ids, presence_penalty, frequency_penalty)
        seq.stats.prompt_tokens = len(prompt_ids)
        seq.stats.submitted_ns = time.perf_counter_ns()
        with self._wake:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            self._pending.append(seq)
            self._wake.notify_all()
        return handle

    # ------------------------------------------------------------------ engine thread

    def _end_token_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_config = getattr(self.model, "generation_config", None)
        for value in (getattr(gen_config, "eos_token_id", None), getattr(self.model.config, "eos_token_id", None),
                      getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif value is not None:
                ids.update(int(i) for i in value)
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
        return ids

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self._pending and not self._active:
                        self._wake.wait()
                    if self._stopping:
                        break
                try:
                    self._admit()
                    self._drop_cancelled()
                    if self._active:
                        self._decode_step()
                except Exception as exc:  # a failed forward must not take the server down
                    log.error("engine step failed:\n%s", traceback.format_exc())
                    for seq in self._active:
                        self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
                    self._active, self._batch = [], KVBatch()
                self._flush()
        for seq in [*self._active, *self._pending]:
            self._finish(seq, "error", error="the server is shutting down")
        self._active, self._pending = [], deque()
        self._flush()

    def _emit(self, handle: SequenceHandle, event: Event) -> None:
        self._outbox.append((handle, event))

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

    def _admit(self) -> None:
        while len(self._active) < self.max_concurrency:
            with self._wake:
                if not self._pending:
                    return
                seq = self._pending.popleft()
            if seq.handle.cancelled.is_set():
                self._finish(seq, "cancelled")
                continue
            try:
                self._prefill(seq)
            except Exception as exc:
                log.error("prefill failed:\n%s", traceback.format_exc())
                self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")

    def _forward(self, ids: torch.Tensor, cache, **kwargs) -> torch.Tensor:
        kwargs[self._cache_kwarg] = cache
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits[:, -1].float()

    def _prefill(self, seq: _Sequence) -> None:
        start = time.perf_counter_ns()
        seq.stats.queue_ns = start - seq.stats.submitted_ns
        seq.sampler = Sampler(seq.params)
        seq.text = TextStream(self.tokenizer, seq.params.skip_special_tokens)
        if seq.budget <= 0:
            self._finish(seq, "length")
            return
        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=self.device)
        for begin in range(0, ids.shape[1], self.prefill_chunk):
            logits = self._forward(ids[:, begin:begin + self.prefill_chunk], cache)
        seq.stats.prefill_ns = time.perf_counter_ns() - start
        seq.position = len(seq.prompt_ids)
        self._advance(seq, logits[0])
        if seq.finished:
            return
        if self.batched:
            self._batch.add(cache, len(seq.prompt_ids))
        else:
            seq.cache = cache
        self._active.append(seq)

    def _drop_cancelled(self) -> None:
        keep = []
        for row, seq in enumerate(self._active):
            if seq.handle.cancelled.is_set():
                self._finish(seq, "cancelled")
            else:
                keep.append(row)
        self._retain(keep)

    def _retain(self, rows: list[int]) -> None:
        if len(rows) == len(self._active):
            return
        if self.batched:
            self._batch.keep(rows)
        self._active = [self._active[r] for r in rows]

    def _decode_step(self) -> None:
        start = time.perf_counter_ns()
        batch = self._active
        if self.batched:
            ids = torch.tensor([[s.last_token] for s in batch], dtype=torch.long, device=self.device)
            positions = torch.tensor([[s.position] for s in batch], dtype=torch.long, device=self.device)
            mask = self._batch.step_mask()
            logits = self._forward(ids, self._batch.cache, attention_mask=mask, position_ids=positions)
        else:
            rows = []
            for s in batch:
                ids = torch.tensor([[s.last_token]], dtype=torch.long, device=self.device)
                rows.append(self._forward(ids, s.cache))
            logits = torch.cat(rows)
        elapsed = time.perf_counter_ns() - start
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, len(batch))
        keep = []
        for row, seq in enumerate(batch):
            seq.stats.decode_ns += elapsed
            seq.position += 1
            self._advance(seq, logits[row])
            if not seq.finished:
                keep.append(row)
        self._retain(keep)

    def _advance(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Sample and record one sequence's next token. A failure here (a sampler fed non-finite logits, a
        tokenizer error) is that sequence's alone: it ends with an error and the batch goes on."""
        try:
            self._accept(seq, self._sample(seq, logits))
        except Exception as exc:
            log.error("sequence failed:\n%s", traceback.format_exc())
            self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> int:
        logits = logits.cpu()
        if seq.generated and (seq.presence_penalty or seq.frequency_penalty):
            # OpenAI's penalties: subtract per-token count * frequency + (count > 0) * presence
            counts = torch.bincount(torch.tensor(seq.generated), minlength=logits.numel())[: logits.numel()].float()
            logits = logits - counts * seq.frequency_penalty - (counts > 0).float() * seq.presence_penalty
        context = None
        if seq.params.repetition_penalty != 1.0:
            context = torch.tensor(seq.prompt_ids + seq.generated, dtype=torch.long)
        return seq.sampler(logits, context)

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Record a sampled token: stream its text, stop at an end token, a stop string or the budget."""
        seq.stats.completion_tokens += 1
        self.tokens_generated += 1
        if seq.sampler.last_logprobs is not None and token not in seq.stop_ids:
            seq.logprobs.append(seq.sampler.last_logprobs)
        if token in seq.stop_ids:
            self._send(seq, seq.text.flush(), final=True)
            self._finish(seq, "stop")
            return
        seq.generated.append(token)
        seq.last_token = token
        out_of_budget = seq.stats.completion_tokens >= seq.budget
        text = seq.text.push(token) + (seq.text.flush() if out_of_budget else "")
        if self._send(seq, text, final=out_of_budget):
            self._finish(seq, "stop")
        elif out_of_budget:
            self._finish(seq, "length")

    def _send(self, seq: _Sequence, text: str, final: bool) -> bool:
        """Emit ``text`` minus any stop string and what follows it; hold back a possible stop-string start
        unless ``final``. True when a stop string was found."""
        stops = seq.params.stop
        seq.unsent += text
        if stops:
            hits = [i for i in (seq.unsent.find(s) for s in stops if s) if i >= 0]
            if hits:
                out, seq.unsent = seq.unsent[: min(hits)], ""
                if out:
                    self._emit(seq.handle, Event(out, logprobs=self._take_logprobs(seq)))
                return True
        hold = 0 if final or not stops else _held_back(seq.unsent, stops)
        out = seq.unsent[: len(seq.unsent) - hold]
        seq.unsent = seq.unsent[len(seq.unsent) - hold:]
        if out:
            self._emit(seq.handle, Event(out, logprobs=self._take_logprobs(seq)))
        return False

    @staticmethod
    def _take_logprobs(seq: _Sequence) -> list:
        taken, seq.logprobs = seq.logprobs, []
        return taken

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        seq.cache = None
        self.finish_counts[reason] += 1
        seq.stats.total_ns = time.perf_counter_ns() - seq.stats.submitted_ns
        self._emit(seq.handle, Event(finish_reason=reason, stats=seq.stats, error=error,
                                     logprobs=self._take_logprobs(seq)))
