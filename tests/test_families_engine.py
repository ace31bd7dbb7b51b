"""The families whose attention keeps more than keys and values, through the engine (``ktcore.engine``): the
paged cache, chunked prefill and batched decode of several sequences. Each sequence's greedy tokens equal plain
Transformers' ``generate`` of that prompt alone (fp32, torch ops).

- DeepSeek-V3.2: the lightning indexer picks each query's ``index_topk`` keys (8 in the tiny model; the prompts
  are longer), its key cache paged beside the latents (``PagedIndexedLayer``).
- Qwen3-Next: its gated-delta-net layers keep a conv and a recurrent state, which the cache keeps per sequence
  (``SeqKV.states``) and stacks for a batch.
- Llama 4: chunked attention (chunks of 8 in the tiny model) over left-padded rows.
"""

from __future__ import annotations

import pytest
import torch

from ktcore.engine.core import EngineCore
from ktcore.engine.paged_cache import PagedIndexedLayer
from ktcore.generate import SamplingParams, forward_step, new_cache
from ktcore.inject import RULE_FILES_DIR, load_model
from ktcore.registry import Registry
from ktcore.testing import MODEL_TYPES, tiny_config, tiny_model
from ktcore.weights.state_dict import StateDictSource

torch.set_num_threads(2)


def _prompts(vocab, lengths, seed=11):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _transformers_greedy(reference, prompt, n):
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _engine_sequences(model, prompts, lengths, **kwargs):
    engine = EngineCore(model, None, **kwargs)
    seqs = [engine.new_sequence(p, SamplingParams(max_new_tokens=n, ignore_eos=True), text=False)
            for p, n in zip(prompts, lengths)]
    for s in seqs:
        engine.add(s)
    while engine.has_work:
        engine.step()
    return engine, seqs


def _engine_greedy(model, prompts, lengths, **kwargs):
    engine, seqs = _engine_sequences(model, prompts, lengths, **kwargs)
    return engine, [s.generated for s in seqs]


def _injected(family, reference):
    model, _ = load_model(StateDictSource(reference), rules=RULE_FILES_DIR / f"{MODEL_TYPES[family]}-cpu.yaml",
                          dtype=torch.float32, registry=Registry(entrypoints=False), progress=False)
    return model


@pytest.fixture(scope="module")
def v32():
    reference = tiny_model("deepseek_v32")
    return reference, _injected("deepseek_v32", reference)


def test_deepseek_v32_indexer_decides_the_tokens(v32):
    """The tiny model's sparsity matters: the same weights attending densely (index_topk past the prompt) give
    other logits, and ktcore's op equals the sparse reference."""
    from transformers import AutoModelForCausalLM

    reference, model = v32
    assert reference.config.index_topk == 8
    dense_config = tiny_config("deepseek_v32")
    dense_config.index_topk = 64
    dense = AutoModelForCausalLM.from_config(dense_config).eval()
    dense.load_state_dict(reference.state_dict())
    ids = torch.randint(3, 512, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got, dense_logits = reference(ids).logits, model(ids).logits, dense(ids).logits
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-5 * scale
    assert torch.equal(got[:, :8], got[:, :8]) and (dense_logits[:, :8] - want[:, :8]).abs().max() <= 1e-5 * scale
    assert (dense_logits[:, 8:] - want[:, 8:]).abs().amax(-1).min() > 1e-2 * scale  # every query past 8 keys differs


def test_deepseek_v32_chunked_prefill_with_ktcore_cache(v32):
    """Prefill in chunks then single tokens through ktcore's one-sequence cache: the indexer keys of earlier
    chunks are read back from the cache. Compared with Transformers fed the same chunks (a full forward may pick
    another key where two index scores tie within float rounding, in Transformers itself)."""
    from transformers import DynamicCache

    reference, model = v32
    ids = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(3))
    spans = [(0, 10), (10, 20)] + [(t, t + 1) for t in range(20, 24)]
    cache, ref_cache = new_cache(model, 64), DynamicCache(config=reference.config)
    assert all(isinstance(layer, PagedIndexedLayer) for layer in cache.layers)
    with torch.no_grad():
        want = torch.cat([reference(ids[:, a:b], cache=ref_cache).logits for a, b in spans], dim=1)
        got = torch.cat([forward_step(model, ids[:, a:b], cache, logits_to_keep=0) for a, b in spans], dim=1)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("block_size", [16, 4])
def test_deepseek_v32_batched_engine_equals_transformers(v32, block_size):
    """Three prompts longer than index_topk, chunked, decoded together (with 4-position blocks their tables
    interleave, so the indexer keys are gathered per sequence): each one's greedy tokens equal Transformers'."""
    reference, model = v32
    prompts = _prompts(reference.config.vocab_size, (21, 12, 30))
    lengths = [8, 10, 6]
    engine, got = _engine_greedy(model, prompts, lengths, max_context=64, max_concurrency=3, prefill_chunk=16,
                                 block_size=block_size)
    assert engine.max_batch_seen == 3 and not engine.cache.state_layers
    assert got == [_transformers_greedy(reference, p, n) for p, n in zip(prompts, lengths)]


def test_deepseek_v32_prefix_restore_carries_the_indexer_keys(v32):
    """A request sharing a 32-position prefix with an earlier one restores its blocks (latents and indexer keys)
    from the prefix store and prefills only the rest: its greedy tokens equal Transformers' over the whole prompt."""
    from ktcore.prefix_cache import PrefixStore

    reference, model = v32
    first, = _prompts(reference.config.vocab_size, (34,), seed=4)
    second = first[:32] + _prompts(reference.config.vocab_size, (9,), seed=5)[0]
    store = PrefixStore(ram_bytes=1 << 26, block_size=16)
    engine = EngineCore(model, None, max_context=64, max_concurrency=2, prefill_chunk=48, prefix_store=store)
    seqs = []
    for p in (first, second):
        seqs.append(engine.new_sequence(p, SamplingParams(max_new_tokens=6, ignore_eos=True), text=False))
        engine.add(seqs[-1])
        while engine.has_work:
            engine.step()
    assert seqs[1].restored == 32
    assert [s.generated for s in seqs] == [_transformers_greedy(reference, p, 6) for p in (first, second)]


@pytest.mark.parametrize("family", ["qwen3_next", "llama4"])
def test_batched_engine_equals_transformers_alone(family):
    """Three different prompts (longer and shorter than Llama 4's chunk of 8), chunked, decoded together as they
    join and leave: each one's greedy tokens equal Transformers' for that prompt alone, and the engine's own run of
    one sequence at a time."""
    reference = tiny_model(family)
    model = _injected(family, reference)
    prompts = _prompts(reference.config.vocab_size, (19, 6, 11), seed=7)
    lengths = [9, 12, 5]
    engine, got = _engine_greedy(model, prompts, lengths, max_context=48, max_concurrency=3, prefill_chunk=8)
    assert engine.max_batch_seen == 3 and engine.prefix is None
    assert engine.cache.state_layers == ([0] if family == "qwen3_next" else [])
    assert got == [_transformers_greedy(reference, p, n) for p, n in zip(prompts, lengths)]
    _, alone = _engine_greedy(model, prompts, lengths, max_context=48, max_concurrency=1, prefill_chunk=8)
    assert alone == got


def test_qwen3_next_states_live_on_the_sequences():
    """Between forwards the linear-attention layer holds nothing; each running sequence holds its own conv and
    recurrent state (batch 1), and a finished or preempted one gives them up with its blocks."""
    model = tiny_model("qwen3_next")
    engine = EngineCore(model, None, max_context=48, max_concurrency=2, prefill_chunk=8)
    seqs = [engine.new_sequence(p, SamplingParams(max_new_tokens=20, ignore_eos=True), text=False)
            for p in _prompts(model.config.vocab_size, (5, 9))]
    for s in seqs:
        engine.add(s)
    for _ in range(4):
        engine.step()
    layer = engine.cache.layers[0]
    assert layer.conv_states[0] is None and layer.recurrent_states[0] is None
    for s in seqs:
        conv, recurrent = s.kv.states[0]
        assert conv[0].shape[0] == 1 and recurrent[0].shape[0] == 1
    assert not torch.equal(seqs[0].kv.states[0][1][0], seqs[1].kv.states[0][1][0])
    engine.cache.release(seqs[0].kv)
    assert seqs[0].kv.states is None


@pytest.mark.parametrize("family", ["qwen3_next", "deepseek_v32"])
def test_preempted_sequences_recompute_their_extra_state(family):
    """Three sequences share too few blocks: the newest are preempted and recomputed from their tokens (Qwen3-Next
    from no recurrent state, DeepSeek-V3.2 with fresh indexer keys), and each still gets Transformers' tokens."""
    reference = tiny_model(family)
    model = reference if family == "qwen3_next" else _injected(family, reference)
    prompts = _prompts(reference.config.vocab_size, (9, 12, 7), seed=3)
    lengths = [14, 10, 16]
    _, seqs = _engine_sequences(model, prompts, lengths, max_context=24, max_concurrency=3, prefill_chunk=8,
                                kv_blocks=6, block_size=8)
    assert sum(s.preemptions for s in seqs) > 0
    assert [s.generated for s in seqs] == [_transformers_greedy(reference, p, n) for p, n in zip(prompts, lengths)]
