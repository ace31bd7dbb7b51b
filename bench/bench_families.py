"""The new MoE families at their real models' widths (issue 19): for each family, a synthetic GGUF of a few
decoder layers at the published widths (``ktcore.testing.REAL_WIDTHS``, random valid blocks written by
``ktcore.weights.gguf_writer.write_synthetic_family_gguf``; routed experts Q4_K, or MXFP4 for gpt_oss as its
checkpoints ship, the rest Q8_0), timed with ``kt bench --layout gpu-cpu`` (the shipped gpu-cpu rule file,
the CLI's loading and warm-up, in a fresh process per family) and, in the same run, with llama.cpp built with
CUDA keeping the routed experts on the CPU (``llama-bench -ngl 999 -fa 1 -ot exps=CPU``) where that build
reads the architecture.

Files are written into ~/.cache/ktcore (KTCORE_CACHE overrides) and removed after their rows with
``--remove`` (a few GiB each at real widths).

    python bench/bench_families.py --threads 16 --llama-bench /tmp/lcpp/llama-bench \\
        --peer-runner ../shared/peers/run-peer.sh --families glm4_moe,gpt_oss,minimax_m2,llama4,qwen3_next,kimi_k2
    python bench/bench_families.py --tiny --device cpu --threads 2 --families qwen3_next   # smoke check
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import CACHE_DIR  # noqa: E402

FAMILIES = ("glm4_moe", "gpt_oss", "minimax_m2", "llama4", "qwen3_next", "kimi_k2")
EXPERT_TYPES = {"gpt_oss": "MXFP4"}  # what the family's published checkpoints use for routed experts
# decoder layers per file: enough MoE layers to time (Kimi-K2's first layer is dense, and each of its MoE
# layers is 9.6 GiB at Q4_K; Qwen3-Next needs 4 for one full-attention layer beside three linear ones)
LAYERS = {"kimi_k2": 2, "qwen3_next": 4}


def family_gguf(family: str, layers: int, tiny: bool) -> Path:
    from ktcore.testing import real_width_config, tiny_config
    from ktcore.weights.gguf_writer import write_synthetic_family_gguf

    experts = EXPERT_TYPES.get(family, "Q4_K")
    label = "tiny" if tiny else f"{layers}l"
    path = CACHE_DIR / f"synthetic-{family}-{label}-{experts.lower()}.gguf"
    if not path.is_file():
        if tiny:
            config = tiny_config("deepseek_v3" if family == "kimi_k2" else family)
        else:
            config = real_width_config(family, layers=layers)
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        write_synthetic_family_gguf(partial, config, {r"_exps\.": experts, "default": "Q8_0"})
        partial.replace(path)
    return path


ROW = re.compile(r"^\S+\s+ktcore\s+([\d.]+)\s+\S+\s+([\d.]+)")


def run_ktcore(path: Path, args) -> tuple[float, float] | str:
    """(prefill tok/s, decode tok/s) from ``kt bench`` in a fresh process, or the error's last line."""
    cmd = [sys.executable, "-c", "import sys; from ktcore.cli import main; sys.exit(main())", "bench", str(path),
           "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens",
           str(args.gen_tokens), "--repeats", str(args.repeats), "--no-llamacpp"]
    cmd += ["--device", "cpu"] if args.device == "cpu" else ["--layout", "gpu-cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "KT_CPU_THREADS": str(args.threads)})
    for line in done.stdout.splitlines():
        match = ROW.match(line)
        if match:
            return float(match[1]), float(match[2])
    lines = (done.stderr or done.stdout).strip().splitlines()
    return f"kt bench failed: {lines[-1] if lines else done.returncode}"


def run_peer(path: Path, args) -> tuple[float, float] | str:
    from bench_hybrid import run_llama_bench

    peer_args = SimpleNamespace(llama_bench=args.llama_bench, peer_runner=args.peer_runner, threads=args.threads,
                                gen_tokens=args.gen_tokens, repeats=args.repeats)
    try:
        prefill, decode = run_llama_bench(path, [args.prompt_tokens], peer_args, None)
    except SystemExit as exc:  # the build does not read this architecture (or this synthetic file)
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        return f"llama.cpp failed: {lines[-1][:120] if lines else ''}"
    return prefill[args.prompt_tokens], decode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--layers", type=int, default=3, help="decoder layers per file (default 3; see LAYERS)")
    ap.add_argument("--tiny", action="store_true", help="the families' tiny widths (smoke check)")
    ap.add_argument("--device", choices=("gpu-cpu", "cpu"), default="gpu-cpu",
                    help="gpu-cpu: the shipped gpu-cpu rule files; cpu: the cpu ones (smoke check)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--llama-bench", default=None, help="llama.cpp CUDA build's llama-bench (no peer rows without)")
    ap.add_argument("--peer-runner", default=None, help="run-peer.sh DIR llama-bench ARGS")
    ap.add_argument("--remove", action="store_true", help="delete each synthetic file after its rows")
    args = ap.parse_args(argv)

    rows = []
    for family in args.families.split(","):
        layers = LAYERS.get(family, args.layers)
        path = family_gguf(family, layers, args.tiny)
        size = path.stat().st_size / 2**30
        print(f"{family}: {path.name} ({size:.2f} GiB)", flush=True)
        ours = run_ktcore(path, args)
        peer = run_peer(path, args) if args.llama_bench else "no --llama-bench"
        rows.append((family, layers, size, ours, peer))
        for label, result in (("ktcore", ours), ("llama.cpp", peer)):
            text = result if isinstance(result, str) else f"prefill {result[0]:.1f} tok/s, decode {result[1]:.2f} tok/s"
            print(f"  {label}: {text}", flush=True)
        if args.remove:
            path.unlink()

    print(f"\nthreads={args.threads} prompt={args.prompt_tokens} decode={args.gen_tokens} repeats={args.repeats} "
          f"(medians); ktcore: kt bench --layout {args.device}; peer: llama.cpp CUDA -ot exps=CPU")
    head = f"{'family':<12} {'layers':>6} {'GiB':>6} {'prefill':>9} {'peer':>9} {'x':>5} {'decode':>8} {'peer':>8} {'x':>5}"
    print(head + "\n" + "-" * len(head))
    ratios = []
    for family, layers, size, ours, peer in rows:
        p, d = ours if not isinstance(ours, str) else (None, None)
        pp, pd = peer if not isinstance(peer, str) else (None, None)
        fmt = lambda v, w, f: f"{v:>{w}{f}}" if v is not None else f"{'-':>{w}}"  # noqa: E731
        xp = p / pp if p and pp else None
        xd = d / pd if d and pd else None
        if xd:
            ratios.append(xd)
        print(f"{family:<12} {layers:>6} {size:>6.2f} {fmt(p, 9, '.1f')} {fmt(pp, 9, '.1f')} {fmt(xp, 5, '.2f')} "
              f"{fmt(d, 8, '.2f')} {fmt(pd, 8, '.2f')} {fmt(xd, 5, '.2f')}")
    if ratios:
        print(f"median decode ratio to the peer: {statistics.median(ratios):.2f}")
    return 0 if all(not isinstance(r[3], str) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
