"""Which sequences run in the next engine step: admission, one prefill chunk, the decode batch, preemption.

Each step runs at most one prefill chunk (the oldest running sequence with more than one pending token, at most
``prefill_chunk`` of them) and one decode step of every sequence with exactly one pending token, so a long prompt
is fed between decode steps of the others. Sequences are admitted in arrival order while fewer than
``max_concurrency`` run and the KV blocks for their first chunk are free. When a running sequence needs a block
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
    """One step's work: ``prefill`` (a sequence and how many of its pending tokens), ``decode`` (one token each),
    ``preempted`` (sent back to the queue by this step)."""

    prefill: tuple[Sequence, int] | None = None
    decode: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.prefill is not None or bool(self.decode)


class Scheduler:
    def __init__(self, cache: PagedCache, max_concurrency: int, prefill_chunk: int, on_admit=None, on_preempt=None):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.cache = cache
        self.max_concurrency = int(max_concurrency)
        self.prefill_chunk = int(prefill_chunk)
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
                if batch.prefill is not None and batch.prefill[0] is victim:
                    batch.prefill = None
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
        for seq in self.running:
            if seq.pending > 1:
                n = min(seq.pending, self.prefill_chunk)
                while not self.cache.can_reserve(seq.kv, seq.kv.length + n):
                    newest = self.running[-1]
                    if newest is seq or not self._preempt_newest(batch, keep=seq):
                        break
                if seq in self.running and self.cache.can_reserve(seq.kv, seq.kv.length + n):
                    self.cache.reserve(seq.kv, seq.kv.length + n)
                    batch.prefill = (seq, n)
                break
        return batch
