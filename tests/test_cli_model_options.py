"""One model option set for every command that loads a model (ktcore/cli/model_options.py), its checks before
anything heavy, and the warm-up that loading does (ktcore/warmup.py)."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys

import pytest
import torch

from ktcore.cli import build_parser
from ktcore.cli.model_options import add_model_options, model_args, open_model

KT = [sys.executable, "-c", "import sys; from ktcore.cli import main; sys.exit(main())"]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
LOADING_COMMANDS = ("run", "chat", "serve", "bench")


def _options(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    """``{option string: (default, choices)}`` of every option a parser takes."""
    return {s: (a.default, a.choices) for a in parser._actions for s in a.option_strings}


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_every_loading_command_takes_the_same_model_options():
    shared = argparse.ArgumentParser()
    add_model_options(shared)
    expected = {k: v for k, v in _options(shared).items() if k not in ("-h", "--help")}
    assert {"--rules", "--layout", "--device", "--threads", "--max-context", "--model-path", "--loader",
            "--no-cuda-graph", "--quiet"} <= set(expected)
    for name in LOADING_COMMANDS:
        got = _options(_subparser(name))
        assert {k: got.get(k) for k in expected} == expected, name  # same flags, same defaults and choices


def test_serve_help_teaches_with_examples():
    text = _subparser("serve").format_help()
    assert "examples:" in text and "kt serve model.gguf" in text and "curl " in text
    assert "model options" in text and "warm-up" in text


def fake_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(60))  # passes the path check, holds no model
    return path


@pytest.mark.parametrize("extra,message", [
    (["--device", "gpu"], "--device gpu: not a device name"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--max-concurrency", "0"], "--max-concurrency must be >= 1"),
    (["--loader", "transformers", "--layout", "cpu"], "--layout applies to ktcore's loader"),
])
def test_serve_refuses_bad_options_in_one_line_before_loading(tmp_path, extra, message):
    r = subprocess.run([*KT, "serve", str(fake_gguf(tmp_path)), *extra], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kt serve: error: ") and message in lines[0], r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device, so --device cuda is valid")
def test_serve_refuses_an_absent_device_before_reading_the_model(tmp_path):
    r = subprocess.run([*KT, "serve", str(fake_gguf(tmp_path)), "--device", "cuda", "-q"], capture_output=True,
                       text=True, env=ENV, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "--device cuda: this machine has no cuda" in r.stderr


def test_model_args_are_the_command_line_defaults():
    args = model_args("m.gguf", threads=3, rules="mine.yaml")
    parsed = build_parser().parse_args(["run", "m.gguf", "--threads", "3", "--rules", "mine.yaml", "-p", "x"])
    assert {k: getattr(args, k) for k in ("rules", "layout", "device", "threads", "max_context", "loader",
                                          "cuda_graph", "model_path")} == \
        {k: getattr(parsed, k) for k in ("rules", "layout", "device", "threads", "max_context", "loader",
                                         "cuda_graph", "model_path")}
    with pytest.raises(TypeError, match="unknown model options \\['temprature'\\]"):
        model_args("m.gguf", temprature=0.5)


# ---------------------------------------------------------------------------------------------- warm-up


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return open_model(model_args("tiny:llama", quiet=True, max_context=256))


def _greedy(gen, ids, n=12):
    from ktcore.generate import SamplingParams

    return list(gen.generate_ids(ids, SamplingParams(max_new_tokens=n, ignore_eos=True)))


def test_open_model_fills_max_context_from_the_model(tiny):
    assert tiny.max_context == 256
    default = model_args("tiny:llama")
    open_model(default)
    assert default.max_context == min(4096, tiny.model.config.max_position_embeddings)


def test_generator_warm_up_leaves_replies_as_they_were(tiny):
    from ktcore.generate import Generator
    from ktcore.warmup import CPU_WARM_UP_NEW_TOKENS, warm_up_generator, warm_up_new_tokens

    assert warm_up_new_tokens(tiny.model) == CPU_WARM_UP_NEW_TOKENS

    ids = [5, 17, 33, 8, 90, 41]
    cold = _greedy(Generator(tiny.model, tiny.tokenizer, max_context=tiny.max_context), ids)
    gen = Generator(tiny.model, tiny.tokenizer, max_context=tiny.max_context)
    assert warm_up_generator(gen) > 0
    assert gen.last_timing.generated_tokens == CPU_WARM_UP_NEW_TOKENS  # the warm-up ran through this generator
    assert _greedy(gen, ids) == cold


def test_engine_warm_up_runs_each_batch_size_through_the_engine(tiny):
    from ktcore.generate import Generator, SamplingParams
    from ktcore.server.engine import Engine
    from ktcore.warmup import engine_batch_sizes, warm_up_engine, warm_up_new_tokens, warm_up_tokens

    assert engine_batch_sizes(8) == [1, 8] and engine_batch_sizes(1) == [1]
    assert engine_batch_sizes(16, graphs=True) == [1, 2, 4, 8, 16]  # each decode graph bucket
    assert engine_batch_sizes(12, graphs=True) == [1, 2, 4, 8, 12]
    engine = Engine(tiny.model, tiny.tokenizer, max_context=tiny.max_context, max_concurrency=3)
    try:
        assert warm_up_engine(engine, tiny.tokenizer, engine_batch_sizes(3)) > 0
        n = warm_up_new_tokens(tiny.model)
        assert engine.tokens_generated == warm_up_tokens(1, n) + 3 * warm_up_tokens(3, n)
        assert engine.max_batch_seen == 3
        ids = [5, 17, 33, 8, 90, 41]

        async def ask():
            handle = engine.submit(ids, SamplingParams(max_new_tokens=12, ignore_eos=True))
            return await handle.collect()

        text, final = asyncio.run(ask())
        assert final.finish_reason == "length"
        expected = Generator(tiny.model, tiny.tokenizer, max_context=tiny.max_context)
        assert text == tiny.tokenizer.decode(_greedy(expected, ids), skip_special_tokens=True)
    finally:
        engine.shutdown()


def test_long_warm_up_prompt_only_for_a_model_off_the_cpu(tiny):
    from ktcore.warmup import long_prompt_tokens

    assert long_prompt_tokens(tiny.model, 512, 256) is None  # CPU kernels take every shape untuned
    off_cpu = torch.nn.Linear(2, 2, device="meta")
    assert long_prompt_tokens(off_cpu, 512, 4096) == 512  # a whole prefill chunk
    assert long_prompt_tokens(off_cpu, 512, 256) == 255  # within the context


def test_warm_ups_prefill_the_long_prompt(tiny, monkeypatch):
    """Off the CPU, the warm-ups also prefill a whole chunk (kt-cuda tunes per rows bucket): forced here on the
    CPU model, both the generator's and the engine's warm-up run it, and replies stay as they were."""
    import ktcore.warmup as warmup
    from ktcore.generate import Generator
    from ktcore.server.engine import Engine

    monkeypatch.setattr(warmup, "on_cpu", lambda model: False)
    ids = [5, 17, 33, 8, 90, 41]
    cold = _greedy(Generator(tiny.model, tiny.tokenizer, max_context=tiny.max_context), ids)
    gen = Generator(tiny.model, tiny.tokenizer, max_context=tiny.max_context, prefill_chunk=64)
    warmup.warm_up_generator(gen, new_tokens=2)
    assert len(gen.last_sequence.prompt_ids) == 64 and len(gen.last_sequence.generated) == 1
    assert _greedy(gen, ids) == cold

    engine = Engine(tiny.model, tiny.tokenizer, max_context=tiny.max_context, max_concurrency=2, prefill_chunk=64)
    rows = []
    forward = engine.core.runner.forward
    engine.core.runner.forward = lambda token_ids, kvs: rows.extend(map(len, token_ids)) or forward(token_ids, kvs)
    try:
        warmup.warm_up_engine(engine, tiny.tokenizer, [1], new_tokens=2)
    finally:
        engine.shutdown()
    assert [n for n in rows if n > 1] == [warmup.WARM_UP_PROMPT_TOKENS, 64]  # an eager decode step has rows of 1
