"""One KV cache holding every active sequence, left-padded to a common length.

Sequences are prefilled alone (their own ``DynamicCache``), then joined to the batch: the shorter side is
left-padded with zeros and the padding is masked out by a 2-D attention mask. Decode steps run the whole
batch in one forward. A sequence that ends is dropped by selecting the remaining rows; columns that only
padding uses any more are trimmed off the left, so the cache never grows past the longest live sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer


def can_batch(cache: DynamicCache) -> bool:
    """Left-padded batching is only sound for full-attention layers that store every position."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[B, H, length, D]`` with zeros before the existing positions."""
    missing = length - t.shape[-2]
    return t if missing == 0 else F.pad(t, (0, 0, missing, 0))


class KVBatch:
    """The batch cache plus its attention mask ``[B, L]`` (1 = a real token, 0 = padding)."""

    def __init__(self):
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, cache: DynamicCache, length: int) -> None:
        """Append one sequence (a batch-1 cache holding ``length`` real positions) as the last row."""
        device = cache.layers[0].keys.device
        new_mask = torch.ones((1, length), dtype=torch.long, device=device)
        if self.cache is None:
            self.cache, self.mask = cache, new_mask
            return
        common = max(self.length, length)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, common), _pad_left(theirs.keys, common)])
            mine.values = torch.cat([_pad_left(mine.values, common), _pad_left(theirs.values, common)])
        self.mask = torch.cat([F.pad(self.mask, (common - self.length, 0)), F.pad(new_mask, (common - length, 0))])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); trim columns no kept row uses."""
        if not rows:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))[:, :, start:]
            layer.values = layer.values.index_select(0, index.to(layer.values.device))[:, :, start:]

    def step_mask(self) -> torch.Tensor:
        """The mask for one more token per row; becomes the batch's mask after the step."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return self.mask
