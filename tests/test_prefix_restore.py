"""The prefix store behind the engine: a request that repeats an earlier prompt restores its blocks instead of
prefilling them and generates exactly what it generates without a cache, from RAM and, after a restart, from
disk (fp32 tiny model: restore equals recompute bit for bit, so greedy text is the same)."""

from __future__ import annotations

import pytest
import torch

from ktcore.prefix_cache import PrefixStore

pytest.importorskip("ktcore.engine", reason="the engine (issue 16 item 1) comes with the engine branch")

from ktcore.generate import Generator, SamplingParams  # noqa: E402
from ktcore.server.loading import load_for_serving  # noqa: E402

PROMPT = "the same long system prompt, then a question. " * 6
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tokenizer, _ = load_for_serving("tiny:llama")
    return model, tokenizer


def _reply(gen, prompt=PROMPT):
    text = "".join(d.text for d in gen.generate(prompt, GREEDY))
    return text, gen.last_sequence.restored


def test_repeated_prompt_is_restored_and_equals_recompute(tiny, tmp_path):
    model, tok = tiny
    expected, _ = _reply(Generator(model, tok, max_context=1024, prefix_store=False))
    n = len(tok(PROMPT)["input_ids"])
    full = (n - 1) // 16 * 16  # the last prompt token is always computed: its logits give the first token

    store = PrefixStore(ram_bytes=1 << 26, disk_dir=tmp_path, disk_bytes=1 << 28, block_size=16)
    gen = Generator(model, tok, max_context=1024, prefix_store=store)
    assert _reply(gen) == (expected, 0)
    assert _reply(gen) == (expected, full)
    assert store.stats()["tiers"]["ram"]["hits"] == full // 16
    store.close()

    restarted = PrefixStore(ram_bytes=0, disk_dir=tmp_path, disk_bytes=1 << 28, block_size=16)
    gen = Generator(model, tok, max_context=1024, prefix_store=restarted)
    _reply(gen, "x")  # a first request sets the cache up
    assert _reply(gen) == (expected, full)
    assert restarted.stats()["tiers"]["disk"]["hits"] == full // 16
