"""Prefix reuse inside the engine (``ktcore.engine.prefix`` over ``ktcore.prefix_cache.PrefixStore``): a request
that shares a long prefix with an earlier one prefills only its new tokens, restored blocks give bit-for-bit the
logits of recomputing them (fp32, the same chunk boundaries), and ``kt chat``'s second turn (``Generator``, and
``kt chat`` itself through ``kt``'s entry point) prefills only what the first turn did not leave in the store;
``bench/bench_prefix_cache.py``'s engine rows restore every shared block from RAM and from disk."""

from __future__ import annotations

import torch

from ktcore.engine.core import EngineCore
from ktcore.generate import Generator, SamplingParams
from ktcore.prefix_cache import PrefixStore
from ktcore.server.tiny import tiny_chat_model
from ktcore.testing import tiny_model

BLOCK = 16


def _greedy(n):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def _first_logits(engine, prompt, n=6):
    """``(sequence, logits of its first token)`` after running ``prompt`` for ``n`` greedy tokens."""
    seen = []
    forward = engine.runner.forward

    def recording(ids, kvs):
        out = forward(ids, kvs)
        seen.append(out)
        return out

    engine.runner.forward = recording
    seq = engine.new_sequence(prompt, _greedy(n), text=False)
    engine.add(seq)
    while engine.has_work:
        engine.step()
    engine.runner.forward = forward
    chunks = -(-(len(prompt) - seq.restored) // 48)  # the prefill calls come first (prefill_chunk 48)
    return seq, seen[chunks - 1][0]


def test_shared_prefix_is_restored_and_equals_recompute():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    first = torch.randint(3, model.config.vocab_size, (50,), generator=g).tolist()
    second = first + torch.randint(3, model.config.vocab_size, (20,), generator=g).tolist()
    store = PrefixStore(ram_bytes=1 << 26, block_size=BLOCK)
    cached = EngineCore(model, None, max_context=128, max_concurrency=2, prefill_chunk=48, prefix_store=store)
    a, _ = _first_logits(cached, first)
    assert a.restored == 0 and a.put_blocks == 3  # 50 prompt + 3 fed reply tokens: three full blocks stored
    b, restored_logits = _first_logits(cached, second)
    assert b.restored == 48
    assert b.prefilled - (len(b.generated) - 1) == len(second) - 48  # only the new tokens went through the model
    fresh = EngineCore(model, None, max_context=128, max_concurrency=2, prefill_chunk=48)
    c, recomputed_logits = _first_logits(fresh, second)  # chunks [0, 48) and [48, 70), as restore + prefill
    assert c.restored == 0
    assert torch.equal(restored_logits, recomputed_logits)
    assert b.generated == c.generated
    stats = store.stats()
    assert stats["hit_tokens"] == 48 and stats["tiers"]["ram"]["hits"] == 3


def test_chat_second_turn_prefills_only_the_new_tokens():
    model, tok = tiny_chat_model("llama")
    gen = Generator(model, tok, max_context=512)
    gen.keep_prefixes()  # as kt chat does
    chat = [{"role": "system", "content": "You answer in one short line, always politely and with care."},
            {"role": "user", "content": "What is the colour of the sea on a clear day?"}]
    reply, _ = gen.complete(chat, _greedy(20))
    turn1 = gen.last_sequence
    chat += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And at night?"}]
    gen.complete(chat, _greedy(8))
    turn2 = gen.last_sequence
    prompt = turn2.prompt_ids
    common = next(i for i, (x, y) in enumerate(zip(turn1.tokens + [-1], prompt)) if x != y)
    expected = min(turn1.put_blocks * BLOCK, common // BLOCK * BLOCK, (len(prompt) - 1) // BLOCK * BLOCK)
    assert expected >= 64  # the first turn's prompt and most of its reply
    assert turn2.restored == expected
    assert turn2.prefilled - (len(turn2.generated) - 1) == len(prompt) - expected
    # the same reply as without the store
    plain = Generator(model, tok, max_context=512)
    assert plain.complete(chat, _greedy(8))[0] == gen.complete(chat, _greedy(8))[0]


def test_server_engine_reuses_a_shared_prefix():
    """Through the server's Engine: the second request restores the first one's full blocks (the store's counts,
    which /metrics shows), and its text equals the text without a store."""
    import asyncio

    from ktcore.server.engine import Engine

    model, tok = tiny_chat_model("llama")
    system = "A long shared system prompt that every request of this test starts with. " * 2
    prompts = [tok(system + q)["input_ids"] for q in ("first question?", "and a second one?")]

    async def run(store):
        engine = Engine(model, tok, max_context=512, max_concurrency=2, prefix_store=store)
        engine.start()
        try:
            return [(await engine.submit(p, _greedy(10)).collect())[0] for p in prompts]
        finally:
            engine.shutdown()

    store = PrefixStore(ram_bytes=1 << 26, block_size=BLOCK)
    texts = asyncio.run(run(store))
    assert texts == asyncio.run(run(None))
    shared = next(i for i, (x, y) in enumerate(zip(*prompts)) if x != y)
    assert store.stats()["hit_tokens"] == shared // BLOCK * BLOCK >= 128


def test_kt_chat_second_turn_prefills_only_the_new_tokens(monkeypatch, capsys, tmp_path):
    """Through ``kt chat``'s entry point: the second turn's timing line counts as cached every whole block the
    first turn computed (its prompt and its reply but the last token), and the one prefill call of that turn
    puts exactly the rest of the prompt through the model."""
    import io
    import re

    from ktcore.cli import main

    model, tok = tiny_chat_model("llama")
    calls = []
    model.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"][0].tolist()), with_kwargs=True)
    monkeypatch.setattr("ktcore.server.tiny.tiny_chat_model", lambda family="llama", seed=0: (model, tok))
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the colour of the sea on a clear day?\nAnd at night?\n"))
    block, new = 4, 10
    assert main(["chat", "tiny:llama", "--system", "You answer in one short line.", "--max-new-tokens", str(new),
                 "--prefix-block", str(block), "--prefix-cache-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    timings = re.findall(r"\[prompt (\d+) tok(?: \((\d+) cached\))?, [^|]*\| generated (\d+) tok", err)
    assert len(timings) == 2, err
    (n1, c1, g1), (n2, c2, g2) = [(int(n), int(c or 0), int(g)) for n, c, g in timings]
    assert c1 == 0 and g1 == new
    assert c2 == (n1 + g1 - 1) // block * block  # all of turn 1's whole blocks
    reply = out.split("\n")[0].removeprefix(">>> ")  # input() writes its prompt to stdout when not a terminal
    chat = [{"role": "system", "content": "You answer in one short line."},
            {"role": "user", "content": "What is the colour of the sea on a clear day?"},
            {"role": "assistant", "content": reply}, {"role": "user", "content": "And at night?"}]
    prompt2 = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert len(prompt2) == n2 and n2 - c2 < n2 - (n1 + g1) + block  # only the new tokens and part of a block
    prefills = [ids for ids in calls if len(ids) > 1]
    assert prefills[-1] == prompt2[c2:]  # what went through the model in turn 2's prefill


def test_bench_prefix_cache_restores_every_shared_block_from_ram_and_disk(tmp_path):
    """``bench/bench_prefix_cache.py``'s engine rows on the tiny llama: the second request restores all the whole
    blocks it shares from RAM, and from disk through a new store on the first one's folder (a restarted
    process); ``ttft_rows`` checks the counts and times each request."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from bench_prefix_cache import ttft_rows

    model, tok = tiny_chat_model("llama")
    gen = Generator(model, tok, max_context=256)
    gen.complete("warm", _greedy(2))  # the KV pools exist before the first timed request, as after kt's warm-up
    ids = tok("A shared prefix that both requests of this test start with, long enough for blocks.")["input_ids"]
    rows = ttft_rows(gen, ids, b"test", 64 << 20, str(tmp_path), repeats=2)
    assert {k: len(v) for k, v in rows.items()} == {"first": 2, "ram": 2, "disk": 2}
    assert all(t > 0 for v in rows.values() for t in v)
    assert gen.engine.prefix is None  # the bench leaves the Generator without a store
