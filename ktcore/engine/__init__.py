"""The one generation engine behind ``kt run``, ``kt chat``, ``kt serve``, ``Generator`` and the benches:
continuous batching with chunked prefill over a paged KV cache, preemption, prefix reuse (see ``core``)."""
