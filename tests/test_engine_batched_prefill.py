"""Batched prefill (ktcore.engine): the prefill chunks of several sequences in one forward, rows of different
lengths right-padded. Greedy tokens of concurrent requests equal each request alone (torch ops on fp32 tiny
models, and kt-cpu-amx's ops where installed); one padded forward's logits equal each row's alone within 1e-5 of
their scale; the scheduler fills a step within its budget; a model with recurrent state prefills one sequence per
step."""

from __future__ import annotations

import pytest
import torch

from ktcore.engine.core import EngineCore
from ktcore.generate import forward_step, new_cache
from ktcore.inject import load_model
from ktcore.registry import Registry
from ktcore.testing import tiny_model
from ktcore.weights.state_dict import StateDictSource
from core_test_helpers import amx_plugin_registry, random_prompts
from core_test_helpers import greedy_params as _greedy
from core_test_helpers import run_engine as _run
from core_test_helpers import solo_greedy as _solo_greedy


def _prompts(vocab, lengths):
    return random_prompts(vocab, lengths, seed=7)


def _record_prefills(engine):
    """Wrap the runner's forward: the new-token counts of every forward of more than one token per row."""
    calls, forward = [], engine.runner.forward

    def recording(token_ids, kvs):
        if max(len(ids) for ids in token_ids) > 1:
            calls.append([len(ids) for ids in token_ids])
        return forward(token_ids, kvs)

    engine.runner.forward = recording
    return calls


def _model(family, ops):
    hf = tiny_model(family)
    if ops == "hf":
        return hf
    registry = Registry(entrypoints=False) if ops == "torch" else amx_plugin_registry()
    model, _ = load_model(StateDictSource(hf), device="cpu", registry=registry, progress=False)
    return model


# ------------------------------------------------------------------------------------------ scheduler


def _fed(batch):
    """What a step does to the scheduled rows' counts (without the model)."""
    for s, n in batch.prefill:
        s.prefilled += n
        s.kv.length += n


def test_scheduler_puts_several_prefills_in_one_step_within_the_budget():
    model = tiny_model("llama")
    prompts = _prompts(model.config.vocab_size, (20, 5, 7, 3))
    for rows in (None, 1):
        engine = EngineCore(model, None, max_context=64, max_concurrency=4, prefill_chunk=8, prefill_budget=24)
        if rows is not None:
            engine.scheduler.max_prefill_rows = rows  # what the engine sets for a model that declines
        seqs = [engine.new_sequence(p, _greedy(2), text=False) for p in prompts]
        for s in seqs:
            engine.add(s)
        batch = engine.scheduler.schedule()
        if rows is None:
            # rows x longest chunk: 3 x 8 = 24 fit; a fourth row would make 32
            assert batch.prefill == [(seqs[0], 8), (seqs[1], 5), (seqs[2], 7)] and batch.decode == []
        else:
            assert batch.prefill == [(seqs[0], 8)]
        _fed(batch)
        batch = engine.scheduler.schedule()
        if rows is None:  # the next step: the rest of the first, then the fourth (2 x 12 > 24: alone)
            assert batch.prefill == [(seqs[0], 8), (seqs[3], 3)]
        else:
            assert batch.prefill == [(seqs[0], 8)]


def test_a_later_prefill_row_preempts_nobody():
    """Blocks for the first row may come from preempting the newest; later rows join only with free blocks."""
    model = tiny_model("llama")
    engine = EngineCore(model, None, max_context=16, max_concurrency=3, prefill_chunk=8, prefill_budget=64,
                        kv_blocks=3, block_size=8)
    a, b, c = (engine.new_sequence(p, _greedy(2), text=False) for p in _prompts(model.config.vocab_size, (12, 12, 6)))
    for s in (a, b, c):
        engine.add(s)
    batch = engine.scheduler.schedule()
    assert batch.prefill == [(a, 8), (b, 8), (c, 6)]
    _fed(batch)
    batch = engine.scheduler.schedule()  # a needs a second block: c, the newest, is preempted; b waits
    assert batch.prefill == [(a, 4)] and batch.preempted == [c]
    assert engine.running == [a, b] and len(b.kv.blocks) == 1


# ------------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize("family", ["llama", "deepseek_v2", "qwen3_moe", "gemma3"])
def test_padded_prefill_logits_equal_each_row_alone(family):
    """Three rows in one forward: a fresh prompt of 9, a continuing chunk of 3 after 11 cached positions (blocks
    not contiguous), a fresh prompt of 2; each row's last-token logits against the row alone, fp32."""
    model = tiny_model(family)
    engine = EngineCore(model, None, max_context=48, max_concurrency=3, prefill_chunk=11, block_size=4)
    prompts = _prompts(model.config.vocab_size, (9, 14, 2))
    seqs = [engine.new_sequence(p, _greedy(1), text=False) for p in prompts]
    cache = engine.cache
    cache.reserve(seqs[1].kv, 11)
    cache.reserve(seqs[0].kv, 4)  # seqs[1]'s blocks will not be one run
    engine.runner.forward([prompts[1][:11]], [seqs[1].kv])
    rows = [(seqs[0], prompts[0]), (seqs[1], prompts[1][11:]), (seqs[2], prompts[2])]
    for s, ids in rows:
        cache.reserve(s.kv, s.kv.length + len(ids))
    assert cache.contiguous_start(seqs[1].kv) is None
    batched = engine.runner.forward([ids for _, ids in rows], [s.kv for s, _ in rows])
    assert [s.kv.length for s in seqs] == [9, 14, 2]
    for prompt, row in zip(prompts, batched):
        with torch.inference_mode():
            alone = forward_step(model, torch.tensor([prompt]), new_cache(model, 48))[0, -1]
        assert (row - alone).abs().max() <= 1e-5 * alone.abs().max()


@pytest.mark.parametrize("family,ops", [("llama", "hf"), ("deepseek_v2", "torch"), ("qwen3_moe", "torch")])
def test_concurrent_requests_prefill_together_and_equal_each_alone(family, ops):
    """Five requests of different prompt lengths arrive at once: their chunks share forwards (rows of different
    lengths), and each request's greedy tokens equal the same model run on it alone."""
    model = _model(family, ops)
    prompts = _prompts(model.config.vocab_size, (23, 5, 12, 2, 9))
    lengths = [6, 8, 5, 7, 6]
    engine = EngineCore(model, None, max_context=48, max_concurrency=5, prefill_chunk=8, prefill_budget=64)
    calls = _record_prefills(engine)
    seqs = _run(engine, prompts, lengths)
    assert calls[0] == [8, 5, 8, 2, 8]  # every request's first chunk in the first forward
    assert [s.generated for s in seqs] == [_solo_greedy(model, p, n) for p, n in zip(prompts, lengths)]


@pytest.mark.parametrize("family", ["llama", "deepseek_v2", "qwen3_moe"])
def test_padded_prefill_with_cpu_amx_ops_within_rounding(family):
    """kt-cpu-amx's linears pick their kernel by row count (fewer than 16 rows or more; int8 activations), so a
    row's logits depend on its batch at rounding level (plugins/kt_cpu_amx/tests/test_cpu_amx_batched_decode.py
    bounds the same for decode; greedy tokens can part at a near tie, so none are compared): five fresh prompts of
    different lengths in one padded forward against each alone through the same ops, every row within 2e-2 of
    the logits' scale and the same greedy token."""
    model = _model(family, "amx")
    assert any(type(m).__name__ == "KLinearCPU" for m in model.modules())
    engine = EngineCore(model, None, max_context=48, max_concurrency=5, prefill_chunk=32, prefill_budget=256)
    prompts = _prompts(model.config.vocab_size, (23, 5, 12, 2, 9))
    seqs = [engine.new_sequence(p, _greedy(1), text=False) for p in prompts]
    for s in seqs:
        engine.cache.reserve(s.kv, len(s.tokens))
    batched = engine.runner.forward([s.tokens for s in seqs], [s.kv for s in seqs])
    errors = []
    for s, row in zip(seqs, batched):
        kv = type(s.kv)()
        engine.cache.reserve(kv, len(s.tokens))
        alone = engine.runner.forward([s.tokens], [kv])[0]
        engine.cache.release(kv)
        errors.append(float((row - alone).abs().max() / alone.abs().max()))
        assert int(row.argmax()) == int(alone.argmax())
    assert max(errors) <= 2e-2, errors


# ------------------------------------------------------------------------------------------ fallback


def test_recurrent_state_model_prefills_one_sequence_per_step():
    """Qwen3-Next's linear attention would advance its state over pad tokens: the runner declines, the engine
    feeds one sequence's chunk per step, and the tokens still equal each request alone."""
    model = tiny_model("qwen3_next")
    engine = EngineCore(model, None, max_context=48, max_concurrency=3, prefill_chunk=8, prefill_budget=64)
    assert "recurrent state" in engine.runner.prefill_batch_problem
    assert engine.scheduler.max_prefill_rows == 1
    calls = _record_prefills(engine)
    prompts = _prompts(model.config.vocab_size, (11, 4, 6))
    seqs = _run(engine, prompts, [5, 5, 5])
    assert calls and all(len(c) == 1 for c in calls)
    assert [s.generated for s in seqs] == [_solo_greedy(model, p, 5) for p in prompts]
    a, b = (engine.new_sequence(p, _greedy(1), text=False) for p in prompts[1:])
    for s in (a, b):
        engine.cache.reserve(s.kv, 8)
    with pytest.raises(ValueError, match="recurrent state"):
        engine.runner.forward([a.tokens, b.tokens], [a.kv, b.kv])
