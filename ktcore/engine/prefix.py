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
        """Before ``seq``'s first chunk (nothing cached): restore what the store holds of its tokens."""
        hashes = self.store.hashes(seq.tokens[: len(seq.tokens) - 1])
        n = self.store.longest_prefix(hashes)
        restored = 0
        if n and self.cache.is_initialized and self.cache.can_reserve(seq.kv, n * self.cache.block_size):
            device = self.cache.layers[0].keys.device
            for h in hashes[:n]:
                payload = self.store.get(h, device)
                if payload is None:  # evicted or unreadable meanwhile
                    break
                self.cache.reserve(seq.kv, (restored + 1) * self.cache.block_size)
                self.cache.write_block(seq.kv.blocks[restored], payload)
                restored += 1
        seq.kv.length = restored * self.cache.block_size
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
        for i in range(seq.put_blocks, full):
            self.store.put(hashes[i], self.cache.read_block(seq.kv.blocks[i]))
        seq.put_blocks = full
