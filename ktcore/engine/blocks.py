"""Fixed-size KV blocks: which are free, and how many holders each one has."""

from __future__ import annotations

import heapq


class OutOfBlocks(RuntimeError):
    """Not enough free KV blocks for a request (the scheduler preempts a sequence, or the caller waits)."""


class BlockAllocator:
    """Hands out block ids ``0 .. num_blocks - 1``, lowest free id first (so one sequence alone gets one
    contiguous run, which the fused CPU decoder reads in place), with a reference count per block."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = int(num_blocks)
        self._free = list(range(self.num_blocks))  # a heap
        self._refs = [0] * self.num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        """``n`` blocks, each with one holder; raises ``OutOfBlocks`` (taking none) when fewer are free."""
        if n > len(self._free):
            raise OutOfBlocks(f"{n} KV blocks asked, {len(self._free)} of {self.num_blocks} free")
        blocks = [heapq.heappop(self._free) for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """One more holder for each of ``blocks`` (all in use)."""
        for b in blocks:
            if self._refs[b] == 0:
                raise ValueError(f"KV block {b} is free; only a block in use can be shared")
        for b in blocks:
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        """One holder less for each of ``blocks``; a block nobody holds becomes free."""
        for b in blocks:
            if self._refs[b] <= 0:
                raise ValueError(f"KV block {b} is freed more often than it was allocated")
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                heapq.heappush(self._free, b)
