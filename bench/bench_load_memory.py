"""Resident memory while loading a ~1 GB GGUF through GGUFSource, tensors kept quantized.

Writes a DeepSeek-V2-Lite-shaped synthetic MoE GGUF (Q4_K experts, Q8_0 dense) to /tmp (streamed, never
held in memory), then loads every tensor two ways and prints resident memory against the bytes actually
materialized:

- ``view``: keep the mmap views the source hands out and touch every byte (an op that computes straight
  from the mapped blocks). Materialized = bytes touched.
- ``copy``: copy every tensor into process memory (an op that repacks), then ``source.release(name)``
  so the mapped pages of that tensor leave the resident set. Materialized = bytes copied.

The claim checked: RSS growth stays below 1.5x the bytes materialized.

    python bench/bench_load_memory.py [--layers 4] [--path /tmp/ktcore-synthetic-moe.gguf] [--mode both]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(path: str, mode: str) -> dict:
    import torch

    from ktcore.weights import open_source

    torch.set_num_threads(1)
    source = open_source(path)
    # experts ops load gate_proj/up_proj/down_proj; the fused gate_up_proj name is the same bytes again
    names = [n for n in source.names() if not n.endswith("experts.gate_up_proj")]
    gc.collect()
    base = rss_bytes()
    kept = []
    materialized = 0
    start = time.perf_counter()
    for name in names:
        qt = source.get(name)
        if mode == "view":
            # touch every page of the view (an op reading the blocks in place)
            qt.data[::4096].sum()
            kept.append(qt)
        else:
            kept.append(qt.data.clone())
            source.release(name)
        materialized += qt.data.numel()
    seconds = time.perf_counter() - start
    gc.collect()
    grown = rss_bytes() - base
    return {"mode": mode, "tensors": len(names), "materialized": materialized, "rss_growth": grown,
            "ratio": grown / materialized, "seconds": seconds, "peak_rss": peak_rss_bytes(), "base_rss": base}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", default="/tmp/ktcore-synthetic-moe.gguf")
    parser.add_argument("--layers", type=int, default=3, help="3 layers (1 dense + 2 MoE) ~ 1 GB")
    parser.add_argument("--mode", choices=["view", "copy", "both"], default="both")
    parser.add_argument("--keep", action="store_true", help="keep the GGUF file afterwards")
    args = parser.parse_args(argv)

    from ktcore.weights.gguf_writer import write_synthetic_moe_gguf

    if not os.path.exists(args.path):
        t = time.perf_counter()
        write_synthetic_moe_gguf(args.path, layers=args.layers, qtype="Q4_K")
        print(f"wrote {args.path}: {os.path.getsize(args.path) / 2**30:.2f} GiB in {time.perf_counter() - t:.1f}s")
    size = os.path.getsize(args.path)
    modes = ["view", "copy"] if args.mode == "both" else [args.mode]
    ok = True
    import subprocess

    for mode in modes:
        if len(modes) > 1:  # each mode in a fresh process, so one's pages do not count for the other
            out = subprocess.run([sys.executable, __file__, "--path", args.path, "--mode", mode, "--keep"],
                                 capture_output=True, text=True)
            print(out.stdout, end="")
            ok &= out.returncode == 0
            continue
        r = run(args.path, mode)
        print(f"[{mode}] file {size / 2**20:.0f} MiB, {r['tensors']} tensors, materialized {r['materialized'] / 2**20:.0f} MiB, "
              f"RSS growth {r['rss_growth'] / 2**20:.0f} MiB -> ratio {r['ratio']:.3f} "
              f"(base RSS {r['base_rss'] / 2**20:.0f} MiB, peak RSS {r['peak_rss'] / 2**20:.0f} MiB, {r['seconds']:.1f}s)")
        ok &= r["ratio"] < 1.5
    if not args.keep and args.mode == "both":
        os.remove(args.path)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
