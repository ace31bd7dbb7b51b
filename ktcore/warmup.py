"""Warm-up at load: a short generation through the very object that will serve, before the first request.

The first calls of a freshly loaded model pay for what later calls reuse: Triton kernels compiled (cached on
disk by Triton), int4 kernel tiles timed (``tuned_config`` in kt-cuda, cached on disk per GPU and problem by
``ktcore.tune_cache``), CUDA graphs captured, the CPU plugins' thread pools started and their fused decode
plans built. ``kt run`` and ``kt chat`` warm their ``Generator`` and ``kt serve`` its engine here, so that
none of it lands in the first reply or in a timing line. A model held wholly on the CPU decodes fewer warm-up
tokens: it has no graph to replay, and its first decode step already builds what later ones reuse.

A model with parts off the CPU is also warmed at the shapes it will meet later: a prompt of a whole prefill chunk
(kt-cuda tunes its int4 tiles per rows bucket, the largest from 256 rows; calls past the streamed-prefill
threshold copy the CPU experts to the GPU), and an engine at every decode graph's batch bucket up to its
concurrency (``ktcore.decode_graphs.batch_bucket``). Left to the first requests, tuning costs seconds of
their time to first token.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable, Sequence

WARM_UP_TEXT = "The quick brown fox jumps over the lazy dog. " * 2
WARM_UP_PROMPT_TOKENS = 8
WARM_UP_NEW_TOKENS = 4  # the first decode step captures a graph, the next ones replay it
CPU_WARM_UP_NEW_TOKENS = 2  # the prefill and one decode step (thread pools, fused decode plans)


def warm_up_ids(tokenizer, vocab_size: int, count: int = WARM_UP_PROMPT_TOKENS) -> list[int]:
    """``count`` prompt ids: a fixed English text through ``tokenizer`` (ids past the model's vocabulary
    folded into it), padded by repetition."""
    ids = [i % vocab_size for i in tokenizer(WARM_UP_TEXT, add_special_tokens=False)["input_ids"]] or [1]
    return (ids * (count // len(ids) + 1))[:count]


def _params(new_tokens: int):
    from .generate import SamplingParams

    return SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)


def on_cpu(model) -> bool:
    """Whether every parameter and buffer of ``model`` is on the CPU."""
    return all(t.device.type == "cpu" for t in itertools.chain(model.parameters(), model.buffers()))


def warm_up_new_tokens(model) -> int:
    """Tokens a warm-up generates: ``CPU_WARM_UP_NEW_TOKENS`` when ``model`` is wholly on the CPU, else
    ``WARM_UP_NEW_TOKENS``."""
    return CPU_WARM_UP_NEW_TOKENS if on_cpu(model) else WARM_UP_NEW_TOKENS


def long_prompt_tokens(model, prefill_chunk: int, max_context: int) -> int | None:
    """Tokens of the long warm-up prompt (a whole prefill chunk, within the context), or ``None`` for a model
    wholly on the CPU, whose kernels take every shape without tuning."""
    if on_cpu(model):
        return None
    return max(1, min(int(prefill_chunk), int(max_context) - 1))


def warm_up_generator(gen, new_tokens: int | None = None) -> float:
    """Prefill a short prompt and decode ``new_tokens`` (default: ``warm_up_new_tokens``) greedily through
    ``gen`` (a ``Generator``), then prefill the long prompt (``long_prompt_tokens``) where there is one; returns
    the seconds it took. The generator's cache is reset by its next request."""
    new_tokens = new_tokens if new_tokens is not None else warm_up_new_tokens(gen.model)
    t0 = time.perf_counter()
    vocab = _vocab_size(gen.model)
    for _ in gen.generate_ids(warm_up_ids(gen.tokenizer, vocab), _params(new_tokens)):
        pass
    long = long_prompt_tokens(gen.model, gen.prefill_chunk, gen.max_context)
    if long is not None:
        for _ in gen.generate_ids(warm_up_ids(gen.tokenizer, vocab, long), _params(1)):
            pass
    return time.perf_counter() - t0


def engine_batch_sizes(max_concurrency: int, graphs: bool = False) -> list[int]:
    """Batch sizes to warm an engine at: one sequence and a full batch; with ``graphs`` (decode steps replay
    CUDA graphs), every graph batch bucket in between too."""
    top = max(1, int(max_concurrency))
    sizes = {1, top}
    if graphs:
        from .decode_graphs import batch_bucket

        sizes |= {batch_bucket(n, top) for n in range(1, top + 1)}
    return sorted(sizes)


def engine_warm_up_sizes(engine) -> list[int]:
    """``engine_batch_sizes`` of ``engine`` (a server ``Engine``): every graph bucket where it decodes through
    CUDA graphs."""
    return engine_batch_sizes(engine.max_concurrency, graphs=engine.core.runner.graph_runner() is not None)


def warm_up_engine(engine, tokenizer, batch_sizes: Iterable[int] | None = None,
                   new_tokens: int | None = None, long_prompt: int | None = None) -> float:
    """Start ``engine`` and run, for each batch size, that many concurrent requests of a short prompt and
    ``new_tokens`` tokens (default: ``warm_up_new_tokens``) through it (``engine.submit``, as the server does),
    waiting for all of them, then one request of ``long_prompt`` prompt tokens (default: ``long_prompt_tokens``;
    ``0``: none); returns the seconds it took. Raises ``RuntimeError`` when a warm-up request fails (the model
    cannot serve)."""
    model = engine.model
    sizes = list(batch_sizes) if batch_sizes is not None else engine_warm_up_sizes(engine)
    new_tokens = new_tokens if new_tokens is not None else warm_up_new_tokens(model)
    if long_prompt is None:
        long_prompt = long_prompt_tokens(model, engine.core.scheduler.prefill_chunk, engine.max_context) or 0
    vocab = _vocab_size(model)
    ids = warm_up_ids(tokenizer, vocab)
    t0 = time.perf_counter()
    engine.start()
    for size in sizes:
        asyncio.run(_concurrent(engine, ids, size, new_tokens))
    if long_prompt:
        asyncio.run(_concurrent(engine, warm_up_ids(tokenizer, vocab, long_prompt), 1, 1))
    return time.perf_counter() - t0


async def _concurrent(engine, ids: Sequence[int], size: int, new_tokens: int) -> None:
    # the engine admits one prompt per step: requests run new_tokens + size tokens, so all size of them decode
    # together for a while (the batch size warmed up) whatever the admission order; submitted together, so that
    # the engine thread cannot run the first ones ahead while the others are still being queued
    with engine.together():
        handles = [engine.submit(list(ids), _params(warm_up_tokens(size, new_tokens))) for _ in range(size)]
    for handle in handles:
        _, final = await handle.collect()
        if final.finish_reason == "error":
            raise RuntimeError(f"the warm-up request failed: {final.error}")


def warm_up_tokens(batch_size: int, new_tokens: int = WARM_UP_NEW_TOKENS) -> int:
    """Tokens each warm-up request of a batch of ``batch_size`` generates."""
    return new_tokens if batch_size == 1 else new_tokens + batch_size


def _vocab_size(model) -> int:
    config = model.config
    return int(getattr(config, "get_text_config", lambda: config)().vocab_size)
