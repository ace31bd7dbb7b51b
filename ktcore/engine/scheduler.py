"""Which sequences run in the next engine step: admission, the prefill chunks, the decode batch, preemption.

Each step runs one forward of prefill chunks and one decode step of every sequence with exactly one pending token,
so a long prompt is fed between decode steps of the others. The prefill rows are the running sequences with more
than one pending token, in admission order, each at most ``prefill_chunk`` of them, while the rows times the
longest chunk (the padded positions the forward computes) stay within ``prefill_budget`` and there are at most
``max_prefill_rows``; the first row is always taken (one per step for models that cannot batch prefill).
Sequences are admitted in arrival order while fewer than ``max_concurrency`` run and the KV blocks for their first
chunk are free. When a running sequence needs a block
and none is free, the most recently admitted sequence is preempted: its blocks are freed and it goes back to the
front of the queue, to be recomputed from its tokens (prompt and reply so far) when it is admitted again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .paged_cache import PagedCache
from .sequence import Sequence


@dataclass
class Batch:
    """One step's work: ``prefill`` (sequences and how many of their pending tokens each, one forward),
    ``decode`` (one token each), ``preempted`` (sent back to the queue by this step)."""

    prefill: list[tuple[Sequence, int]] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prefill) or bool(self.decode)


class Scheduler:
    def __init__(self, cache: PagedCache, max_concurrency: int, prefill_chunk: int, on_admit=None, on_preempt=None,
                 prefill_budget: int | None = None, max_prefill_rows: int | None = None):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.cache = cache
        self.max_concurrency = int(max_concurrency)
        self.prefill_chunk = int(prefill_chunk)
        self.prefill_budget = int(prefill_budget) if prefill_budget is not None else self.prefill_chunk
        if self.prefill_budget < 1:
            raise ValueError(f"prefill_budget must be >= 1, got {prefill_budget}")
        self.max_prefill_rows = int(max_prefill_rows) if max_prefill_rows is not None else self.max_concurrency
        self.on_admit = on_admit  # called with a sequence before its first chunk is reserved (prefix restore)
        self.on_preempt = on_preempt  # called with a sequence before its blocks are freed (prefix put)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out (finished or cancelled) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.kv.blocks:
            self.cache.release(seq.kv)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_concurrency:
            seq = self.waiting[0]
            if self.on_admit is not None and seq.kv.length == 0:
                self.on_admit(seq)
            first = seq.kv.length + min(seq.pending, self.prefill_chunk)
            if not self.cache.can_reserve(seq.kv, first):
                if not self.running:  # nothing to wait for: it can never fit
                    raise RuntimeError(f"the KV cache ({self.cache.num_blocks} blocks of {self.cache.block_size}) "
                                       f"cannot hold {first} positions")
                return
            self.cache.reserve(seq.kv, first)  # held from now on, so the next admission counts without them
            self.waiting.popleft()
            self.running.append(seq)

    def _preempt_newest(self, batch: Batch, keep: Sequence) -> bool:
        """Preempt the newest running sequence other than ``keep``; False when there is none."""
        for victim in reversed(self.running):
            if victim is not keep:
                self.running.remove(victim)
                if self.on_preempt is not None:
                    self.on_preempt(victim)
                self.cache.release(victim.kv)
                victim.preemptions += 1
                self.waiting.appendleft(victim)
                batch.preempted.append(victim)
                if victim in batch.decode:
                    batch.decode.remove(victim)
                batch.prefill = [(s, n) for s, n in batch.prefill if s is not victim]
                return True
        return False

    def schedule(self) -> Batch:
        self._admit()
        batch = Batch()
        for seq in list(self.running):
            if seq not in self.running or seq.pending != 1:
                continue
            while not self.cache.can_reserve(seq.kv, seq.kv.length + 1):
                if not self._preempt_newest(batch, keep=seq):
                    raise RuntimeError("the KV cache cannot hold one running sequence")
            if seq in self.running:
                self.cache.reserve(seq.kv, seq.kv.length + 1)
                batch.decode.append(seq)
        longest = 0
        for seq in list(self.running):
            if seq not in self.running or seq.pending <= 1:
                continue
            n = min(seq.pending, self.prefill_chunk)
            if batch.prefill:
                # later rows join only within the budget and blocks that are free: batching preempts nobody
                if (len(batch.prefill) >= self.max_prefill_rows
                        or (len(batch.prefill) + 1) * max(longest, n) > self.prefill_budget):
                    break
                if not self.cache.can_reserve(seq.kv, seq.kv.length + n):
                    break
            else:
                while not self.cache.can_reserve(seq.kv, seq.kv.length + n):
                    newest = self.running[-1]
                    if newest is seq or not self._preempt_newest(batch, keep=seq):
                        break
                if seq not in self.running or not self.cache.can_reserve(seq.kv, seq.kv.length + n):
                    break
            self.cache.reserve(seq.kv, seq.kv.length + n)
            batch.prefill.append((seq, n))
            longest = max(longest, n)
        return batch
