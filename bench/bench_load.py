"""Load time and time to first token of `kt run`, against reading the file and against llama.cpp, same run.

For each model (SmolLM2-135M Q4_1, Gemma 3 270M Q4_K_M), every figure is the median over ``--repeats``
fresh processes, each measured twice: cold (the file's pages dropped from the page cache first, with
``posix_fadvise(DONTNEED)``, which needs no root and touches no other file) and warm (right after a read):

- read: reading the whole file with 8 MiB ``read()`` calls (the floor any loader has);
- kt load: ``ktcore.cli.run.load_generator``, the code `kt run` loads with (shipped rule files, the
  tokenizer, every weight), timed after Python's imports (torch, ktcore, Transformers' modeling modules of
  the two families), so it compares with llama.cpp's ``Llama()``; with the converted tokenizer in ktcore's
  cache (every load after a file's first), and once per model with an empty cache ("kt first load", warm
  page cache); "kt cpu" is the warm load's process CPU time (the wall times count other processes' load);
- kt first line / first token: from starting ``kt run MODEL -p PROMPT`` to its first stderr line and to the
  first character of the reply on stdout (imports, loading, prefill: what a user waits for), cold and warm;
  "/read cold" divides by the file's cold read (the issue's target: load within 2x of it);
- llama.cpp load: ``llama_cpp.Llama(model_path=...)``; llama.cpp first token: from starting a Python
  process that imports llama_cpp, loads and generates one token for the same chat prompt, cold and warm.

    python bench/bench_load.py [--models smollm2,gemma3] [--repeats 3] [--threads 2] [--llama-batch N]

llama.cpp's batched prompt evaluation segfaults on the development Xeon (see results/xeon-2026-11-28.md);
``--llama-batch 1`` (the default here) evaluates the prompt one token at a time, which works there.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import ModelUnavailable, gemma3_gguf, smollm2_gguf  # noqa: E402

PROMPT = "What is the capital of France?"
MODELS = {"smollm2": smollm2_gguf, "gemma3": gemma3_gguf}


def drop_cache(path: Path) -> None:
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_seconds(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass
    return time.perf_counter() - t0


def child(kind: str, path: str, threads: int, llama_batch: int) -> dict:
    """Runs in a fresh process: one load, timed after the imports."""
    if kind == "kt":
        from ktcore.cli import build_parser
        from ktcore.cli.run import load_generator

        # imports before the clock (llama.cpp's figure has none): ktcore's, and Transformers' modules of both
        # families, which Transformers imports on first use (about 2 s here)
        import ktcore.generate, ktcore.inject, ktcore.registry, ktcore.weights  # noqa: E401,F401
        import transformers.models.gemma3.modeling_gemma3, transformers.models.llama.modeling_llama  # noqa: E401,F401
        args = build_parser().parse_args(["run", path, "-p", PROMPT, "-q", "--threads", str(threads)])
        t0, c0 = time.perf_counter(), time.process_time()
        load_generator(args)
        return {"load": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    import llama_cpp

    t0 = time.perf_counter()
    llama_cpp.Llama(model_path=path, n_threads=threads, n_ctx=2048, n_batch=llama_batch, verbose=False)
    return {"load": time.perf_counter() - t0}


def run_child(kind: str, path: Path, args, env: dict | None = None) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", kind, str(path), "--threads", str(args.threads),
                        "--llama-batch", str(args.llama_batch)], capture_output=True, text=True, check=True, env=env)
    return json.loads(r.stdout.strip().splitlines()[-1])


# as `kt run` does: the chat template when the file has one, else the prompt as plain text
LLAMA_FIRST_TOKEN = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_threads=int(sys.argv[2]), n_ctx=2048, n_batch=int(sys.argv[3]), verbose=False)
if "tokenizer.chat_template" in llm.metadata:
    chunks = llm.create_chat_completion([{"role": "user", "content": sys.argv[4]}], max_tokens=1, temperature=0, stream=True)
else:
    chunks = llm.create_completion(sys.argv[4], max_tokens=1, temperature=0, stream=True)
for chunk in chunks:
    print("token", flush=True)
    break
"""


def first_output(command: list[str], env: dict) -> tuple[float, float | None]:
    """(seconds to the first stdout byte, seconds to the first stderr byte) of ``command``, then killed."""
    t0 = time.perf_counter()
    p = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first_err = None
    try:
        while True:
            ready, _, _ = select.select([p.stdout, p.stderr] if first_err is None else [p.stdout], [], [], 60)
            if p.stderr in ready:
                first_err = time.perf_counter() - t0
                os.read(p.stderr.fileno(), 1 << 16)
            if p.stdout in ready:
                if not os.read(p.stdout.fileno(), 1):
                    raise RuntimeError(f"{command} ended without output")
                return time.perf_counter() - t0, first_err
    finally:
        p.kill()
        p.wait()


def measure(name: str, path: Path, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    kt = [sys.executable, "-c", "from ktcore.cli import console_main; console_main()", "run", str(path),
          "-p", PROMPT, "--threads", str(args.threads)]
    llama = [sys.executable, "-c", LLAMA_FIRST_TOKEN, str(path), str(args.threads), str(args.llama_batch), PROMPT]
    rows = {k: [] for k in ("read_cold", "read_warm", "kt_cold", "kt_warm", "kt_cpu", "llama_cold", "llama_warm",
                            "kt_first_line", "kt_ttft_cold", "kt_ttft_warm", "llama_ttft_cold", "llama_ttft_warm")}
    with tempfile.TemporaryDirectory() as empty_cache:  # the tokenizer converted as on a file's first load
        rows["kt_first"] = [run_child("kt", path, args, dict(os.environ, KTCORE_CACHE=empty_cache))["load"]]
    for _ in range(args.repeats):
        drop_cache(path)
        rows["read_cold"].append(read_seconds(path))
        rows["read_warm"].append(read_seconds(path))
        for kind in ("kt", "llama"):
            drop_cache(path)
            rows[f"{kind}_cold"].append(run_child(kind, path, args)["load"])
            warm = run_child(kind, path, args)
            rows[f"{kind}_warm"].append(warm["load"])
            if kind == "kt":
                rows["kt_cpu"].append(warm["cpu"])
        for kind, command in (("kt", kt), ("llama", llama)):
            for temp in ("cold", "warm"):
                if temp == "cold":
                    drop_cache(path)
                ttft, first_line = first_output(command, env)
                rows[f"{kind}_ttft_{temp}"].append(ttft)
                if kind == "kt":
                    rows["kt_first_line"].append(first_line)
    med = {k: statistics.median(v) for k, v in rows.items()}
    med["mib"] = path.stat().st_size / 2**20
    return med


def table(head: list[str], rows: list[list[str]]) -> None:
    print(" | ".join(head))
    for row in rows:
        print(" | ".join(row))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-batch", type=int, default=1)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.threads, args.llama_batch)))
        return 0
    results = {}
    for name in args.models.split(","):
        try:
            path = MODELS[name]()
        except ModelUnavailable as exc:
            print(f"{name}: skipped ({exc})", file=sys.stderr)
            continue
        print(f"{name}: measuring {path}", file=sys.stderr, flush=True)
        results[name] = measure(name, path, args)
    print(f"medians of {args.repeats} runs, {args.threads} threads; seconds; cold = file dropped from the page cache")
    print("\nload, after the imports")
    table(["model", "MiB", "read cold", "read warm", "kt first load", "kt load cold", "/read cold", "kt load warm",
           "kt cpu warm", "llama load cold", "llama load warm", "kt/llama cold", "kt/llama warm"],
          [[name, f"{m['mib']:.0f}", f"{m['read_cold']:.3f}", f"{m['read_warm']:.3f}", f"{m['kt_first']:.2f}",
            f"{m['kt_cold']:.2f}", f"{m['kt_cold'] / m['read_cold']:.1f}x", f"{m['kt_warm']:.2f}", f"{m['kt_cpu']:.2f}",
            f"{m['llama_cold']:.2f}", f"{m['llama_warm']:.2f}", f"{m['kt_cold'] / m['llama_cold']:.2f}",
            f"{m['kt_warm'] / m['llama_warm']:.2f}"] for name, m in results.items()])
    print("\nfrom process start (kt run / a llama_cpp script)")
    table(["model", "kt 1st line", "kt 1st token cold", "/read cold", "kt 1st token warm", "llama 1st token cold",
           "llama 1st token warm", "kt/llama cold", "kt/llama warm"],
          [[name, f"{m['kt_first_line']:.2f}", f"{m['kt_ttft_cold']:.2f}",
            f"{m['kt_ttft_cold'] / m['read_cold']:.1f}x", f"{m['kt_ttft_warm']:.2f}", f"{m['llama_ttft_cold']:.2f}",
            f"{m['llama_ttft_warm']:.2f}", f"{m['kt_ttft_cold'] / m['llama_ttft_cold']:.2f}",
            f"{m['kt_ttft_warm'] / m['llama_ttft_warm']:.2f}"] for name, m in results.items()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
