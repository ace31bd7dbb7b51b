"""Prefix reuse through a ``ktcore.prefix_cache.PrefixStore``: the full blocks of a sequence that ends (or is
preempted) are put under their chained hashes; a sequence being admitted gets the longest stored prefix of its
tokens copied into its own blocks and prefills only the rest. The last token is always recomputed (a block is
restored only when a token follows it), since the first sampled token needs its logits."""

from __future__ import annotations

from .paged_cache import PagedCache
from .sequence import Sequence


class PrefixReuse:
    def __init__(self, cache: PagedCache, store):
        if store.block_size != cache.block_size:
            raise ValueError(f"the prefix store names blocks of {store.block_size} tokens and the KV cache's blocks "
                             f"hold {cache.block_size}; give both the same block size")
        self.cache, self.store = cache, store

    def restore(self, seq: Sequence) -> None:
        """Before ``seq``'s first chunk (nothing cached): restore what the store holds of its tokens. (The
        pools are allocated by the first forward: the engine's first request restores nothing.)"""
        bs = self.cache.block_size
        hashes = self.store.hashes(seq.tokens[: len(seq.tokens) - 1])
        n = self.store.longest_prefix(hashes)
        restored = 0
        if n and self.cache.is_initialized and self.cache.can_reserve(seq.kv, n * bs):
            payload = self.store.get_many(hashes[:n], self.cache.layers[0].keys.device)
            if payload is not None:  # blocks evicted meanwhile: the leading ones still stored came back
                restored = payload[0].shape[0]
                self.cache.reserve(seq.kv, restored * bs)
                self.cache.write_blocks(seq.kv.blocks[:restored], payload)
        seq.kv.length = restored * bs
        seq.put_blocks = restored
        if seq.preemptions == 0:
            seq.restored = seq.kv.length
            self.store.record_request(len(seq.prompt_ids), seq.kv.length)

    def put(self, seq: Sequence) -> None:
        """Offer ``seq``'s cached full blocks not offered yet."""
        full = seq.kv.length // self.cache.block_size
        if full <= seq.put_blocks:
            return
        hashes = self.store.hashes(seq.tokens[: full * self.cache.block_size])
        self.store.put_many(hashes[seq.put_blocks : full], self.cache.read_blocks(seq.kv.blocks[seq.put_blocks : full]))
        seq.put_blocks = full
