"""The engine (ktcore.engine): block allocator, paged cache, scheduler admission and preemption, chunked
prefill, batched decode. Every comparison is on fp32 tiny models with torch ops, where the paged, chunked and
batched paths compute the same sums up to float rounding: greedy tokens must be equal, logits within 1e-5 of
their scale."""

from __future__ import annotations

import pytest
import torch

from ktcore.engine.blocks import BlockAllocator, OutOfBlocks
from ktcore.engine.core import EngineCore
from ktcore.engine.paged_cache import PagedCache, SeqKV
from ktcore.engine.scheduler import Scheduler
from ktcore.generate import forward_step, new_cache
from ktcore.testing import tiny_model
from core_test_helpers import greedy_params as _greedy
from core_test_helpers import random_prompts
from core_test_helpers import run_engine as _run
from core_test_helpers import solo_greedy as _solo_greedy


def _prompts(vocab, lengths):
    return random_prompts(vocab, lengths, seed=5)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


# ------------------------------------------------------------------------------------------ blocks


def test_allocator_hands_out_lowest_blocks_and_counts_holders():
    a = BlockAllocator(6)
    assert a.allocate(2) == [0, 1] and a.allocate(1) == [2]
    a.free([1])
    assert a.allocate(2) == [1, 3]  # the lowest free first: a lone sequence gets one run
    a.share([3])
    a.free([3])
    assert a.refcount(3) == 1 and a.num_free == 2
    a.free([3])
    assert a.refcount(3) == 0 and a.num_free == 3
    with pytest.raises(ValueError, match="freed more often"):
        a.free([3])
    with pytest.raises(ValueError, match="is free"):
        a.share([5])


def test_out_of_blocks_takes_none():
    a = BlockAllocator(3)
    a.allocate(2)
    with pytest.raises(OutOfBlocks, match="2 KV blocks asked, 1 of 3 free"):
        a.allocate(2)
    assert a.num_free == 1


def test_paged_cache_reserve_slots_and_contiguity(llama):
    cache = PagedCache(llama, num_blocks=4, block_size=4)
    kv, other = SeqKV(), SeqKV()
    cache.reserve(kv, 5)
    assert kv.blocks == [0, 1] and cache.contiguous_start(kv) == 0
    cache.reserve(other, 1)
    cache.reserve(kv, 9)
    assert kv.blocks == [0, 1, 3] and cache.contiguous_start(kv) is None
    assert cache.slots(kv, 3, 9).tolist() == [3, 4, 5, 6, 7, 12]
    assert not cache.can_reserve(other, 9)
    with pytest.raises(OutOfBlocks):
        cache.reserve(other, 9)
    assert other.blocks == [2]
    cache.release(kv)
    assert kv.blocks == [] and kv.length == 0 and cache.allocator.num_free == 3


# ------------------------------------------------------------------------------------------ scheduler


def test_scheduler_admits_up_to_max_concurrency_and_free_blocks(llama):
    engine = EngineCore(llama, None, max_context=32, max_concurrency=2, prefill_chunk=8, kv_blocks=4,
                        block_size=8)
    seqs = [engine.new_sequence(p, _greedy(4), text=False) for p in _prompts(llama.config.vocab_size, (20, 3, 3))]
    for s in seqs:
        engine.add(s)
    batch = engine.scheduler.schedule()
    # two run (max_concurrency); the first prefills one chunk of 8, the second waits for its turn
    assert engine.running == seqs[:2] and list(engine.waiting) == seqs[2:]
    assert batch.prefill == [(seqs[0], 8)] and batch.decode == []
    assert seqs[0].kv.blocks == [0]


def test_admission_waits_for_blocks(llama):
    cache = PagedCache(llama, num_blocks=3, block_size=4)
    sched = Scheduler(cache, max_concurrency=4, prefill_chunk=8)
    engine = EngineCore(llama, None, max_context=12, max_concurrency=4, kv_blocks=3, block_size=4)
    long, short = (engine.new_sequence(p, _greedy(2), text=False) for p in _prompts(llama.config.vocab_size, (10, 6)))
    sched.add(long)
    sched.add(short)
    batch = sched.schedule()
    assert batch.prefill == [(long, 8)] and sched.running == [long]  # short needs 2 blocks, 1 is free
    assert list(sched.waiting) == [short]


def test_preemption_recomputes_and_keeps_the_tokens(llama):
    """Three sequences whose contexts need 3 blocks each share 6 blocks: the newest are preempted when the
    older ones grow, recomputed from their tokens later, and every sequence still gets its solo tokens."""
    prompts = _prompts(llama.config.vocab_size, (9, 12, 7))
    lengths = [14, 10, 16]
    engine = EngineCore(llama, None, max_context=24, max_concurrency=3, prefill_chunk=8, kv_blocks=6,
                        block_size=8)
    seqs = _run(engine, prompts, lengths)
    assert sum(s.preemptions for s in seqs) > 0
    assert [s.generated for s in seqs] == [_solo_greedy(llama, p, n) for p, n in zip(prompts, lengths)]
    assert engine.cache.allocator.num_free == 6  # every block came back


def test_a_sequence_that_can_never_fit_is_refused(llama):
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        EngineCore(llama, None, max_context=64, kv_blocks=3, block_size=16)


# ------------------------------------------------------------------------------------------ prefill, batching


def test_chunked_prefill_equals_unchunked(llama):
    prompt = _prompts(llama.config.vocab_size, (45,))[0]
    rows = {}
    for chunk in (7, 512):
        engine = EngineCore(llama, None, max_context=64, max_concurrency=1, prefill_chunk=chunk)
        seq = engine.new_sequence(prompt, _greedy(6), text=False)
        engine.add(seq)
        logits = None
        while seq.pending > 1:
            batch = engine.scheduler.schedule()
            start = seq.kv.length
            logits = engine.runner.forward([seq.tokens[start : start + batch.prefill[0][1]]], [seq.kv])
        rows[chunk] = logits[0]
        seq.accept(int(logits[0].argmax()))
        while engine.has_work:
            engine.step()
        rows[chunk, "tokens"] = seq.generated
    assert (rows[7] - rows[512]).abs().max() <= 1e-5 * rows[512].abs().max()
    assert rows[7, "tokens"] == rows[512, "tokens"] == _solo_greedy(llama, prompt, 6)


def _torch_injected(family):
    from ktcore.inject import load_model
    from ktcore.registry import Registry
    from ktcore.weights.state_dict import StateDictSource

    model, _ = load_model(StateDictSource(tiny_model(family)), device="cpu", registry=Registry(entrypoints=False),
                          progress=False)
    return model


SLOW = pytest.mark.slow


@pytest.mark.parametrize("family,injected", [("llama", False), ("qwen3_moe", False),
                                             pytest.param("deepseek_v2", False, marks=SLOW),
                                             pytest.param("gemma3", False, marks=SLOW),
                                             pytest.param("qwen3_moe", True, marks=SLOW),
                                             pytest.param("deepseek_v2", True, marks=SLOW)])
def test_batched_greedy_equals_solo(family, injected):
    """Four sequences of different prompt lengths (longer and shorter than Gemma 3's window of 8), chunked,
    decoded together as they join and leave: each one's greedy tokens equal its plain solo decoding."""
    model = _torch_injected(family) if injected else tiny_model(family)
    prompts = _prompts(model.config.vocab_size, (23, 5, 12, 1))
    lengths = [10, 16, 6, 12]
    engine = EngineCore(model, None, max_context=48, max_concurrency=4, prefill_chunk=8)
    seqs = _run(engine, prompts, lengths)
    assert engine.max_batch_seen >= 3
    assert [s.generated for s in seqs] == [_solo_greedy(model, p, n) for p, n in zip(prompts, lengths)]


def test_batched_logits_equal_solo_logits(llama):
    """One decode step of three left-padded rows against each row alone: fp32 logits within 1e-5."""
    engine = EngineCore(llama, None, max_context=48, max_concurrency=3)
    seqs = [engine.new_sequence(p, _greedy(4), text=False) for p in _prompts(llama.config.vocab_size, (13, 4, 30))]
    for s in seqs:
        engine.add(s)
    while any(not s.generated for s in seqs):
        engine.step()
    kvs = [s.kv for s in seqs]
    for kv in kvs:
        engine.cache.reserve(kv, kv.length + 1)
    batched = engine.runner.forward([[s.tokens[-1]] for s in seqs], kvs)
    for s, row in zip(seqs, batched):
        cache = new_cache(llama, 64)
        with torch.inference_mode():
            alone = forward_step(llama, torch.tensor([s.tokens]), cache)[0, -1]
        assert (row - alone).abs().max() <= 1e-5 * alone.abs().max()


def test_recurrent_state_model_generates_without_prefix_reuse():
    """Qwen3-Next's linear-attention layers keep state outside the blocks: no prefix reuse (``keep_prefixes`` leaves
    it off), each request starts from no state, and greedy tokens equal Transformers' own, twice in a row (batches
    of such models: tests/test_families_engine.py)."""
    from ktcore.generate import Generator

    model = tiny_model("qwen3_next")
    gen = Generator(model, None, max_context=64)
    gen.keep_prefixes()
    assert gen.engine.max_concurrency == 1 and gen.engine.prefix is None
    prompt = [5, 6, 7, 8, 9, 10, 11]
    want = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    for _ in range(2):
        assert list(gen.generate_ids(prompt, _greedy(6))) == want
