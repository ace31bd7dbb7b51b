"""The server's engine alone: batched decode equals solo decode, joins and leaves mid-batch, stop strings,
sliding-window models batched too (Transformers' masks over the paged cache's left-padded gather)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from ktcore.engine.sequence import held_back
from ktcore.server.engine import Engine, SamplingParams


def _greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny):
    return tiny[0], tiny[1]


def _reference(model, prompt_ids, n):
    """Plain Transformers greedy decoding, one sequence, no server code."""
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0, attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


def test_staggered_batch_matches_transformers_greedy(model_and_tokenizer):
    """Sequences of different prompt lengths join an already running batch at different steps and leave
    at different steps; each one's tokens equal Transformers' own greedy decoding of it alone."""
    model, tok = model_and_tokenizer
    prompts = [tok(t)["input_ids"] for t in ("short", "a somewhat longer prompt here", "mid length", "z")]
    lengths = [60, 24, 40, 50]
    expected = [tok.decode(_reference(model, p, n)) for p, n in zip(prompts, lengths)]

    async def run():
        engine = Engine(model, tok, max_concurrency=4)
        engine.start()
        try:
            handles, firsts = [], []
            for p, n in zip(prompts, lengths):
                handles.append(engine.submit(p, _greedy(n)))
                # the next request is submitted once this one decodes (its first text arrived), so it joins a
                # running batch whatever the machine's load (a fixed sleep raced on a busy CI machine)
                firsts.append(await handles[-1].__anext__())
            results = []
            for first, h in zip(firsts, handles):
                if first.finish_reason is not None:
                    results.append((first.text, first))
                else:
                    text, final = await h.collect()
                    results.append((first.text + text, final))
            return results, engine.max_batch_seen
        finally:
            engine.shutdown()

    results, widest = asyncio.run(run())
    assert [text for text, _ in results] == expected
    assert [final.stats.completion_tokens for _, final in results] == lengths
    assert all(final.finish_reason == "length" for _, final in results)
    assert widest >= 2


def test_max_concurrency_queues_the_rest(model_and_tokenizer):
    model, tok = model_and_tokenizer

    async def run():
        engine = Engine(model, tok, max_concurrency=2)
        engine.start()
        try:
            handles = [engine.submit(tok(f"p{i}")["input_ids"], _greedy(8)) for i in range(5)]
            results = [await h.collect() for h in handles]
            return results, engine.max_batch_seen
        finally:
            engine.shutdown()

    results, widest = asyncio.run(run())
    assert widest == 2
    assert all(final.stats.completion_tokens == 8 for _, final in results)
    assert max(final.stats.queue_ns for _, final in results) > 0


def test_stop_string_spanning_tokens_is_never_emitted(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = tok("stop test")["input_ids"]
    full = tok.decode(_reference(model, prompt, 30))
    stop = full[10:13]  # three characters: three tokens of this tokenizer

    async def run():
        engine = Engine(model, tok)
        engine.start()
        try:
            pieces = []
            async for event in engine.submit(prompt, _greedy(30, stop=(stop,))):
                pieces.append(event.text)
                if event.finish_reason:
                    return pieces, event
        finally:
            engine.shutdown()

    pieces, final = asyncio.run(run())
    assert "".join(pieces) == full[: full.index(stop)]
    assert final.finish_reason == "stop"
    assert held_back("abcST", ["STOP"]) == 2 and held_back("abc", ["STOP"]) == 0


def test_sliding_window_model_batches_and_matches_transformers():
    """Gemma 3 (sliding-window layers, window 8) decodes batched, with prompts longer than the window."""
    from ktcore.server.tiny import tiny_chat_model

    model, tok = tiny_chat_model("gemma3")
    engine = Engine(model, tok, max_concurrency=4)
    prompts = [tok(t)["input_ids"] for t in ("a prompt longer than the window", "short")]
    expected = [tok.decode(_reference(model, p, 12)) for p in prompts]

    async def run():
        engine.start()
        try:
            handles = [engine.submit(p, _greedy(12)) for p in prompts]
            return [(await h.collect())[0] for h in handles]
        finally:
            engine.shutdown()

    assert asyncio.run(run()) == expected
    assert engine.max_batch_seen == 2


def test_a_failing_sequence_ends_alone(model_and_tokenizer, monkeypatch):
    """A sequence whose sampling fails (here: raises for the sequence asking for a frequency penalty; the
    sampler itself survives any logits) ends with an error; the batch it shared goes on and its other
    sequence still gets the tokens it gets alone."""
    from ktcore.engine.sequence import Sequence

    original = Sequence.sample

    def failing(self, logits):
        if self.frequency_penalty:
            raise RuntimeError("sampling failed")
        return original(self, logits)

    monkeypatch.setattr(Sequence, "sample", failing)
    model, tok = model_and_tokenizer
    prompt = tok("the sea")["input_ids"]
    expected = tok.decode(_reference(model, prompt, 20))

    async def run():
        engine = Engine(model, tok, max_concurrency=4)
        engine.start()
        try:
            good = engine.submit(prompt, _greedy(20))
            await asyncio.sleep(0.05)
            bad = engine.submit(prompt, SamplingParams(max_new_tokens=20, temperature=1.0, ignore_eos=True),
                                frequency_penalty=0.5)
            return await good.collect(), await bad.collect()
        finally:
            engine.shutdown()

    (text, final), (_, bad_final) = asyncio.run(run())
    assert bad_final.finish_reason == "error" and bad_final.error
    assert final.finish_reason == "length" and text == expected


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen3_moe", marks=pytest.mark.slow),
                                    pytest.param("deepseek_v2", marks=pytest.mark.slow)])
def test_server_greedy_text_equals_kt_runs(family):
    """Three chat requests served together (batched) give the text ``kt run``'s path (``Generator``) gives
    each alone."""
    from ktcore.generate import Generator
    from ktcore.server.tiny import tiny_chat_model

    model, tok = tiny_chat_model(family)
    chats = [[{"role": "user", "content": text}] for text in ("hello there", "a longer question about boats?", "x")]
    gen = Generator(model, tok, max_context=256)
    expected = [gen.complete(chat, _greedy(24))[0] for chat in chats]

    async def run():
        engine = Engine(model, tok, max_context=256, max_concurrency=3)
        engine.start()
        try:
            handles = [engine.submit(gen.encode(chat), _greedy(24)) for chat in chats]
            return [(await h.collect())[0] for h in handles], engine.max_batch_seen
        finally:
            engine.shutdown()

    texts, widest = asyncio.run(run())
    assert texts == expected
    assert widest >= 2
