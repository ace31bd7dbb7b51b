"""llama.cpp (llama-cpp-python) as the benchmarks' peer, timed in a process of its own.

In ktcore's process llama.cpp would share torch's OpenMP runtime and the passive wait policy ktcore sets at
import (``ktcore.OMP_POLICY_SET_HERE``): its threads meet at a barrier for every op, and SmolLM2 decoded at 32
tok/s there against 149 alone on the same 2 threads. ``LlamaCppProcess`` runs this file as a script (so that
the child imports llama_cpp and numpy, never ktcore or torch) with the user's own environment, and times
prompt + greedy steps there exactly as ``bench_llamacpp`` does in-process.

Protocol: ``python llamacpp_peer.py bench MODEL THREADS N_CTX EXTRA_BUFTS KV_OVERRIDES_JSON``; the child prints
``ready``, then for each JSON request ``{"ids", "gen", "warm_up"}`` on stdin one JSON ``[prefill tok/s, decode
tok/s]`` line. ``python llamacpp_peer.py server EXTRA_BUFTS OPTIONS`` runs llama-cpp-python's server the same
way (``server_command``; ``bench/bench_serve.py``).
"""

from __future__ import annotations

import json
import os
import runpy
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext


def next_token(llm) -> int:
    """Greedy token from llama.cpp's last logits (``llm.scores`` is only filled with ``logits_all``)."""
    import llama_cpp
    import numpy as np

    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
    return int(np.argmax(logits))


def bench_llamacpp(llm, prompt_ids, gen_tokens: int, repeats: int, warm_up: bool = True) -> tuple[float, float]:
    """Median (prefill tok/s, decode tok/s) of llama.cpp doing the same: prompt, then greedy steps."""
    if warm_up:
        llm.reset()
        llm.eval(prompt_ids[:8])
    prefill, decode = [], []
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        token = next_token(llm)
        prefill.append(len(prompt_ids) / (time.perf_counter() - t0))
        t1 = time.perf_counter()
        for _ in range(gen_tokens):
            llm.eval([token])
            token = next_token(llm)
        decode.append(gen_tokens / (time.perf_counter() - t1))
    return statistics.median(prefill), statistics.median(decode)


@contextmanager
def extra_bufts_off():
    """llama.cpp's extra buffer types (weight repacking, AMX) off for the models loaded meanwhile: ``Llama()``
    takes no such argument, so llama-cpp-python's model defaults are patched and restored."""
    import llama_cpp.llama as llama_module

    defaults = llama_module.llama_cpp.llama_model_default_params

    def without_extra_bufts():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = without_extra_bufts
    try:
        yield
    finally:
        llama_module.llama_cpp.llama_model_default_params = defaults


def open_llama(path, threads: int, n_ctx: int, extra_bufts: bool = True, kv_overrides: dict | None = None, **options):
    """``llama_cpp.Llama`` on ``path`` as every benchmark loads it (``options``: more of its arguments)."""
    import llama_cpp

    with nullcontext() if extra_bufts else extra_bufts_off():
        return llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                               n_batch=512, verbose=False, kv_overrides=kv_overrides or None, **options)


def peer_env() -> dict:
    """The environment for a llama.cpp child: the user's, without the OpenMP wait policy ktcore set for itself."""
    import ktcore

    env = dict(os.environ)
    if ktcore.OMP_POLICY_SET_HERE:
        env.pop("OMP_WAIT_POLICY", None)
    return env


def server_command(options: list[str], extra_bufts: bool = True) -> list[str]:
    """llama-cpp-python's OpenAI server (``python -m llama_cpp.server OPTIONS``) started through this script,
    with the extra buffer types off unless ``extra_bufts``; run it with ``peer_env()``."""
    return [sys.executable, __file__, "server", "1" if extra_bufts else "0", *options]


class LlamaCppProcess:
    """llama.cpp on ``path`` in a child process; ``bench(ids, gen_tokens, warm_up)`` -> (prefill, decode) tok/s
    of one run. ``extra_bufts``: whether llama.cpp's extra buffer types (repacking, AMX) may be used
    (``ktcore.cli.bench.llamacpp_extra_bufts_work``)."""

    def __init__(self, path, threads: int, n_ctx: int, extra_bufts: bool = True, kv_overrides: dict | None = None):
        args = ["bench", str(path), str(threads), str(n_ctx), "1" if extra_bufts else "0", json.dumps(kv_overrides or {})]
        self.proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=peer_env())
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"llama.cpp could not load {path} (exit {self.proc.returncode}): {line}")

    def bench(self, prompt_ids, gen_tokens: int, warm_up: bool = False) -> tuple[float, float]:
        self.proc.stdin.write(json.dumps({"ids": list(map(int, prompt_ids)), "gen": gen_tokens, "warm_up": warm_up}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp process ended (exit {self.proc.wait()})")
        prefill, decode = json.loads(line)
        return prefill, decode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def main(argv: list[str]) -> int:
    if argv[0] == "server":
        with nullcontext() if argv[1] == "1" else extra_bufts_off():
            sys.argv = ["llama_cpp.server", *argv[2:]]
            runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
        return 0
    llm = open_llama(argv[1], int(argv[2]), int(argv[3]), argv[4] == "1", json.loads(argv[5]))
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        result = bench_llamacpp(llm, request["ids"], request["gen"], 1, warm_up=request["warm_up"])
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
