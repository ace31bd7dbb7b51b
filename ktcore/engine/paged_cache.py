"""The paged KV cache every attention op reads through ``cache.update(k, v, layer_idx)``.

Each layer holds one pool of ``num_blocks + 1`` fixed-size blocks, laid out as slots ``[1, heads, slots, dim]``
(slot ``block * block_size + offset``; the MLA ops store their latent and rotary key the same way, one "head").
The last block is scratch: padding reads it and padded rows of a captured step write it. A sequence owns a
``SeqKV``: its block table and how many of its positions are cached.

A forward is planned by ``plan_step(rows)`` (one ``SeqKV`` and its new-token count per batch row; rows with
fewer new tokens than the most are right-padded with tokens that write the scratch slot): new keys go to their
slots (``index_copy_``) and attention gets each row's cached keys gathered into ``[B, heads, L, dim]``,
left-padded to the longest row (the 2-D mask ``plan_step`` returns hides the padding and the pad tokens;
Transformers builds the causal and sliding-window masks from it, since left padding keeps each row's distances). A single row whose
blocks are one contiguous run is read in place (a view, no gather). ``end_step`` advances the lengths.

DeepSeek-V3.2's layers (``PagedIndexedLayer``) keep a third pool, the indexer's one key per position, in the same
slots: ``cache.update_indexer(k, layer_idx)`` writes and reads it as ``update`` does the others.

Layers of recurrent state (Qwen3-Next's linear attention: Transformers' ``LinearAttentionLayer``) hold no blocks: each
sequence's conv and recurrent states live on its ``SeqKV`` (``states``); ``plan_step`` puts the rows' states into the
layer (stacked on the batch dim; a sequence with nothing cached starts from none) and ``end_step`` takes each row's
back, leaving the layer empty between forwards. No prefix reuse for these models: blocks alone do not restore them.

Without a plan the cache is one sequence that owns the pool from slot 0 (``new_cache``; tests, ``score``):
each layer appends at its own length and hands attention the filled prefix (a sliding layer, its window).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import cache_utils
from transformers.cache_utils import Cache, CacheLayerMixin, StaticCache, StaticLayer, StaticSlidingWindowLayer

# Transformers' layer of recurrent state alone (Qwen3-Next's gated delta net): its states are kept per sequence
LinearAttentionLayer = getattr(cache_utils, "LinearAttentionLayer", None)

from .blocks import BlockAllocator, OutOfBlocks

DEFAULT_BLOCK_SIZE = 16


class ContextOverflowError(ValueError):
    """The request does not fit in the KV cache."""


@dataclass
class SeqKV:
    """One sequence's place in the cache: its blocks in position order and how many positions are cached."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0
    # recurrent-state layers (linear attention): {layer: ({state: conv state}, {state: recurrent state})}, batch 1
    states: dict | None = None


@dataclass
class StepPlan:
    """What one forward writes and reads. ``view``: ``(first slot, cached positions)`` of a single contiguous
    row, read in place; else ``write`` (slot per new token, row-major) and ``gather`` (``[B, L]`` slots)."""

    seen: int  # positions before the new tokens, in the (padded) coordinates attention sees
    view: tuple[int, int] | None = None
    write: torch.Tensor | None = None
    gather: torch.Tensor | None = None


class PagedLayer(CacheLayerMixin):
    """One layer's block pool (see the module docstring)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: "PagedCache", sliding_window: int | None = None):
        super().__init__()
        self.owner = owner
        self.max_cache_len = owner.num_slots
        self.sliding_window = sliding_window
        self.length = 0  # without a plan: positions of the one sequence

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        slots = self.owner.num_slots
        self.keys = key_states.new_empty((1, key_states.shape[1], slots, key_states.shape[-1]))
        self.values = value_states.new_empty((1, value_states.shape[1], slots, value_states.shape[-1]))
        scratch = self.owner.scratch_slot
        self.keys[:, :, scratch:].zero_()  # padding reads these: finite, masked
        self.values[:, :, scratch:].zero_()
        self.is_initialized = True

    @property
    def pools(self) -> tuple[torch.Tensor, ...]:
        return self.keys, self.values

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self.owner.plan
        if plan is None:
            return self._append(key_states, value_states)
        new = key_states.shape[-2]
        if plan.view is not None:
            start, seen = plan.view
            self.keys.narrow(2, start + seen, new).copy_(key_states)
            self.values.narrow(2, start + seen, new).copy_(value_states)
            return self.keys.narrow(2, start, seen + new), self.values.narrow(2, start, seen + new)
        return self._scatter_gather(self.keys, key_states, plan), self._scatter_gather(self.values, value_states, plan)

    @staticmethod
    def _scatter_gather(pool: torch.Tensor, states: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        batch, heads, new, dim = states.shape
        pool[0].index_copy_(1, plan.write, states.transpose(0, 1).reshape(heads, batch * new, dim))
        rows, length = plan.gather.shape
        return pool[0].index_select(1, plan.gather.reshape(-1)).view(heads, rows, length, dim).transpose(0, 1)

    def _append(self, key_states, value_states):
        start = self.length
        end = start + key_states.shape[-2]
        if end > self.owner.scratch_slot:
            raise ContextOverflowError(
                f"the KV cache holds {self.owner.scratch_slot} positions and this call needs {end} (raise --max-context)")
        # narrow, not [:, :, start:end]: one view op instead of Python's multi-slice indexing, per layer and step
        self.keys.narrow(2, start, end - start).copy_(key_states)
        self.values.narrow(2, start, end - start).copy_(value_states)
        self.length = end
        if self.sliding_window is not None:
            start = max(0, end - key_states.shape[-2] - (self.sliding_window - 1))
            return self.keys[:, :, start:end], self.values[:, :, start:end]
        return self.keys.narrow(2, 0, end), self.values.narrow(2, 0, end)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        plan = self.owner.plan
        if plan is not None:
            return plan.seen + query_length, 0
        if self.sliding_window is not None:  # mirrors Transformers' DynamicSlidingWindowLayer
            kv_offset = max(self.length - self.sliding_window + 1, 0)
            return min(self.length, self.sliding_window - 1) + query_length, kv_offset
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        plan = self.owner.plan
        return plan.seen if plan is not None else self.length

    def get_max_length(self) -> int:
        return self.sliding_window if self.sliding_window is not None else -1

    def reset(self) -> None:
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        self.length = max(0, self.length - abs(tokens_to_remove))


class PagedSlidingLayer(PagedLayer):
    is_sliding = True


class PagedIndexedLayer(PagedLayer):
    """A full-attention layer of DeepSeek-V3.2 with the indexer's keys (``[B, T, index_dim]``, one per position)
    as a third pool ``[1, 1, slots, index_dim]`` in the same slots as the latents."""

    def __init__(self, owner: "PagedCache", index_dim: int):
        super().__init__(owner)
        self.index_dim = int(index_dim)
        self.indexer_length = 0  # without a plan: positions of the one sequence

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.indexer_keys = key_states.new_zeros((1, 1, self.owner.num_slots, self.index_dim))
        super().lazy_initialization(key_states, value_states)

    @property
    def pools(self) -> tuple[torch.Tensor, ...]:
        return self.keys, self.values, self.indexer_keys

    def update_indexer(self, key_states: torch.Tensor) -> torch.Tensor:
        if not self.is_initialized:
            raise RuntimeError("update_indexer before update: the layer's pools are allocated by its first update")
        states = key_states.unsqueeze(1).to(self.indexer_keys.dtype)  # [B, 1, S, D]: one "head"
        new = states.shape[-2]
        plan = self.owner.plan
        if plan is None:
            start, end = self.indexer_length, self.indexer_length + new
            if end > self.owner.scratch_slot:
                raise ContextOverflowError(
                    f"the KV cache holds {self.owner.scratch_slot} positions and this call needs {end} (raise --max-context)")
            self.indexer_keys.narrow(2, start, new).copy_(states)
            self.indexer_length = end
            return self.indexer_keys.narrow(2, 0, end)[:, 0]
        if plan.view is not None:
            start, seen = plan.view
            self.indexer_keys.narrow(2, start + seen, new).copy_(states)
            return self.indexer_keys.narrow(2, start, seen + new)[:, 0]
        return self._scatter_gather(self.indexer_keys, states, plan)[:, 0]

    def reset(self) -> None:
        super().reset()
        self.indexer_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.indexer_length = max(0, self.indexer_length - abs(tokens_to_remove))


class PagedCache(Cache):
    """Block pools for every layer of ``model`` (``num_blocks`` blocks of ``block_size`` positions, plus the
    scratch block), the block allocator, and the plan of the forward under way."""

    def __init__(self, model, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE):
        self.block_size = int(block_size)
        self.num_blocks = int(num_blocks)
        self.allocator = BlockAllocator(self.num_blocks)
        self.scratch_slot = self.num_blocks * self.block_size
        self.num_slots = self.scratch_slot + self.block_size
        self.plan: StepPlan | None = None
        self._storage = False  # every paged layer's pools allocated (they stay once they are)
        self.state_layers: list[int] = []  # layers holding recurrent state (linear attention), not blocks
        layers = []
        for i, layer in enumerate(StaticCache(config=model.config, max_cache_len=self.scratch_slot).layers):
            if type(layer) is StaticLayer:
                layers.append(PagedLayer(self))
            elif type(layer) is getattr(cache_utils, "StaticIndexedLayer", None):  # DeepSeek-V3.2
                layers.append(PagedIndexedLayer(self, model.config.index_head_dim))
            elif type(layer) is StaticSlidingWindowLayer:
                # StaticSlidingWindowLayer stores min(window, max_cache_len) as its max_cache_len
                layers.append(PagedSlidingLayer(self, sliding_window=layer.max_cache_len))
            else:  # not paged: recurrent state, per sequence where ``states_per_sequence``
                layers.append(layer)
                self.state_layers.append(i)
        super().__init__(layers=layers)
        # every state layer one whose states plan_step/end_step move per sequence; else one sequence at a time
        self.states_per_sequence = all(type(layers[i]) is LinearAttentionLayer for i in self.state_layers)
        # Transformers asks for these on every forward; the layers never change
        self._is_sliding = [getattr(layer, "is_sliding", False) for layer in layers]
        self._is_linear = [i in self.state_layers for i in range(len(layers))]

    @property
    def is_sliding(self) -> list[bool]:
        return self._is_sliding

    @property
    def is_linear(self) -> list[bool]:
        return self._is_linear

    def reset_state(self) -> None:
        """Clear the recurrent-state layers for a new sequence."""
        for i in self.state_layers:
            self.layers[i].reset()

    def _load_states(self, kvs: list[SeqKV]) -> None:
        """Give the state layers the rows' own states (none for a sequence with nothing cached)."""
        fresh = [kv.length == 0 for kv in kvs]
        if any(fresh) and not all(fresh):
            raise ValueError("a forward of several rows either starts every sequence or continues every one")
        for i in self.state_layers:
            layer = self.layers[i]
            for s in range(layer.number_of_states):
                if fresh[0]:
                    conv = recurrent = None
                else:
                    convs = [kv.states[i][0][s] for kv in kvs]
                    recurrents = [kv.states[i][1][s] for kv in kvs]
                    conv = None if convs[0] is None else convs[0] if len(kvs) == 1 else torch.cat(convs)
                    recurrent = None if recurrents[0] is None else recurrents[0] if len(kvs) == 1 else torch.cat(recurrents)
                layer.conv_states[s], layer.recurrent_states[s] = conv, recurrent
                layer.is_conv_states_initialized[s] = conv is not None
                layer.is_recurrent_states_initialized[s] = recurrent is not None
                layer.has_previous_state[s] = not fresh[0]

    def _take_states(self, kvs: list[SeqKV]) -> None:
        """Hand each row its states back (views of the batch) and leave the state layers empty."""
        for kv in kvs:
            kv.states = kv.states if kv.states is not None else {}
        for i in self.state_layers:
            layer = self.layers[i]
            n = layer.number_of_states
            for b, kv in enumerate(kvs):
                kv.states[i] = tuple({s: None if pool[s] is None else pool[s][b : b + 1] for s in range(n)}
                                     for pool in (layer.conv_states, layer.recurrent_states))
            self._load_states([SeqKV()])  # empty: nothing of a live sequence stays reachable through the layer

    # -- sequences

    def blocks_for(self, length: int) -> int:
        return -(-length // self.block_size)

    def reserve(self, kv: SeqKV, length: int) -> None:
        """Give ``kv`` blocks for ``length`` positions; raises ``OutOfBlocks`` (taking none) when short."""
        missing = self.blocks_for(length) - len(kv.blocks)
        if missing > 0:
            kv.blocks += self.allocator.allocate(missing)

    def can_reserve(self, kv: SeqKV, length: int) -> bool:
        return self.blocks_for(length) - len(kv.blocks) <= self.allocator.num_free

    def release(self, kv: SeqKV) -> None:
        self.allocator.free(kv.blocks)
        kv.blocks, kv.length, kv.states = [], 0, None

    def slots(self, kv: SeqKV, start: int, end: int) -> torch.Tensor:
        """Slot ids of positions ``start .. end - 1`` of ``kv`` (blocks reserved)."""
        pos = torch.arange(start, end)
        table = torch.tensor(kv.blocks, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def contiguous_start(self, kv: SeqKV) -> int | None:
        """The first slot of ``kv`` when its blocks are one run (its positions are consecutive slots)."""
        b = kv.blocks
        if b and b[-1] - b[0] == len(b) - 1 and all(y == x + 1 for x, y in zip(b, b[1:])):
            return b[0] * self.block_size
        return None

    # -- one forward

    def plan_step(self, rows: list[tuple[SeqKV, int]], device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Plan a forward of ``rows`` (``(kv, new tokens)``, blocks reserved). Returns ``(attention mask [B, L],
        position ids [B, T])``, both ``None`` for a single row (its positions follow from the cache length, as the
        model derives them).

        Several rows: ``T`` is the most new tokens of a row; a row with fewer is right-padded (its pad tokens come
        after its real ones, positions repeating its last). Pad tokens write the scratch slot and are masked out
        of every row's keys; each row's cached keys are left-padded so its real new tokens sit at the last ``T``
        key indices' start (``seen .. seen + n - 1``), which keeps every distance the causal and sliding masks
        look at. Right, not left: a left pad token of a fresh row would see no key at all, and an op filling
        masked scores with -inf would give it NaN, which its keys would carry into the scratch slot."""
        if self.state_layers and self.states_per_sequence:
            self._load_states([kv for kv, _ in rows])
        if len(rows) == 1:
            kv, new = rows[0]
            start = self.contiguous_start(kv)
            self.plan = StepPlan(seen=kv.length, view=(start, kv.length)) if start is not None else StepPlan(
                seen=kv.length, write=self.slots(kv, kv.length, kv.length + new).to(device),
                gather=self.slots(kv, 0, kv.length + new)[None].to(device))
            return None, None
        new = max(n for _, n in rows)
        seen = max(kv.length for kv, _ in rows)
        write, gather, positions = [], [], []
        mask = torch.zeros((len(rows), seen + new), dtype=torch.bool)
        for i, (kv, n) in enumerate(rows):
            pad = new - n
            scratch = torch.full((pad,), self.scratch_slot)
            write.append(torch.cat([self.slots(kv, kv.length, kv.length + n), scratch]))
            left = seen - kv.length
            gather.append(torch.cat([torch.full((left,), self.scratch_slot), self.slots(kv, 0, kv.length + n), scratch]))
            mask[i, left : seen + n] = True
            last = kv.length + n - 1
            positions.append(torch.cat([torch.arange(kv.length, kv.length + n), torch.full((pad,), last)]))
        self.plan = StepPlan(seen=seen, write=torch.cat(write).to(device), gather=torch.stack(gather).to(device))
        return mask.to(device), torch.stack(positions).to(device)

    def graph_plan(self, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Plan a decode step from device tensors alone (what a CUDA graph captures): row ``b`` writes its new
        token at ``positions[b]`` of its block table ``tables[b]`` and reads its slots right-padded to the
        table's width (the scratch slot past the position). Returns which slots each row sees, ``[B, L]``."""
        rows, width = tables.shape
        bs = self.block_size
        offsets = torch.arange(width * bs, device=tables.device)
        slots = (tables[:, :, None] * bs).expand(rows, width, bs).reshape(rows, width * bs) + offsets % bs
        visible = offsets[None, :] <= positions[:, None]
        self.plan = StepPlan(seen=width * bs - 1, write=slots.gather(1, positions[:, None]).view(-1),
                             gather=torch.where(visible, slots, self.scratch_slot))
        return visible

    def end_step(self, rows: list[tuple[SeqKV, int]]) -> None:
        self.plan = None
        if self.state_layers and self.states_per_sequence:
            self._take_states([kv for kv, _ in rows])
        for kv, new in rows:
            kv.length += new

    def abort_step(self) -> None:
        self.plan = None
        if self.state_layers and self.states_per_sequence:
            self._load_states([SeqKV()])

    # -- blocks as tensors (prefix store payloads)

    def _blocks_view(self, pool: torch.Tensor) -> torch.Tensor:
        return pool[0].view(pool.shape[1], self.num_blocks + 1, self.block_size, pool.shape[-1])

    def read_blocks(self, blocks: list[int]) -> tuple[torch.Tensor, ...]:
        """Every pool of ``blocks`` for every layer, stacked on dim 0: ``(k0, v0, k1, v1, ...)`` (an indexed layer
        adds its indexer keys after its values), each ``[len(blocks), heads, block_size, dim]``."""
        index = torch.tensor(blocks, dtype=torch.long, device=self.layers[0].keys.device)
        out = []
        for layer in self.layers:
            for pool in layer.pools:
                out.append(self._blocks_view(pool).index_select(1, index).transpose(0, 1).contiguous())
        return tuple(out)

    def write_blocks(self, blocks: list[int], payload: tuple[torch.Tensor, ...]) -> None:
        """The inverse of ``read_blocks`` (``payload`` may hold more blocks than ``blocks``: the first are used)."""
        index = torch.tensor(blocks, dtype=torch.long, device=self.layers[0].keys.device)
        pools = [pool for layer in self.layers for pool in layer.pools]
        for pool, stacked in zip(pools, payload):
            self._blocks_view(pool).index_copy_(1, index, stacked[: len(blocks)].transpose(0, 1).to(pool.dtype))

    @property
    def is_initialized(self) -> bool:
        # asked at every decode step: the layers are walked only until their pools exist
        if not self._storage:
            self._storage = all(layer.is_initialized for layer in self.layers if isinstance(layer, PagedLayer))
        return self._storage


def new_cache(model, max_context: int, block_size: int = DEFAULT_BLOCK_SIZE) -> PagedCache:
    """A cache of ``max_context`` positions for one sequence (used without plans: each call appends)."""
    return PagedCache(model, -(-int(max_context) // block_size), block_size)


__all__ = ["PagedCache", "PagedLayer", "PagedSlidingLayer", "PagedIndexedLayer", "SeqKV", "StepPlan", "new_cache", "ContextOverflowError",
           "OutOfBlocks", "DEFAULT_BLOCK_SIZE"]
