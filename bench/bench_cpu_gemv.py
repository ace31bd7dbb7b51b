"""In-cache decode GEMV (one token) of kt-cpu-amx's integer-dot kernels on one 4-bit K-quant matrix.

The matrix is small enough to stay in L2 (default Q4_K 256 x 2048: 288 KiB packed), so the figure is the
kernel's instruction cost per weight, not memory bandwidth. One pool thread (no other thread takes rows),
``--repeats`` calls of ``Runtime.linear`` with m = 1 (activation quantization included: 2048 values, small
next to 524288 weights), median over ``--rounds`` rounds of the calling thread's CPU time (the pool of one thread
runs the work on it; CPU time leaves out the time other processes take the core on a shared machine; the
median wall time is printed beside it).

    python bench/bench_cpu_gemv.py [--qtype Q4_K] [--rows 256] [--k 2048] [--isa avx2] [--save y.pt | --check y.pt]

``--save`` writes the outputs of a fixed input, ``--check`` compares this build's outputs to such a file bit
for bit (for a kernel change that must not change any float).

Measured (2026-11-29, the 2-core shared AMD EPYC dev VM, AVX2; old and new builds alternated 12 times, each run
11 rounds of 100 calls): Q4_K 256 x 2048 before the 8-group scale expansion (b062b65) 50.5 us per call
(median of medians; best 32.8 us, 16.0 weights/ns), after 36.0 us (best 23.4 us, 22.4 weights/ns), paired
ratio 1.42x (range 1.00-2.33 on this noisy machine); about 2-4 us of each call is the Python call, the
activation quantization and the pool (4 x 2048: 1.8-4 us).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KT_CPU_PIN", "0")

import numpy as np  # noqa: E402
import ktcore  # noqa: F401,E402  (before torch: the OpenMP wait policy ktcore sets, see ktcore/__init__.py)
import torch  # noqa: E402

from kt_cpu_amx import repack  # noqa: E402
from kt_cpu_amx.runtime import kernels, select_isa  # noqa: E402
from ktcore.weights.quants import ggml_type  # noqa: E402
from ktcore.weights.tensor import QuantizedTensor  # noqa: E402


def random_matrix(type_name: str, n: int, k: int, seed: int = 0) -> QuantizedTensor:
    """Random quant bits and sub-scales, fp16 super-block scales in a sane range."""
    t = ggml_type(type_name)
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n * k // t.block_size, t.type_size), dtype=np.uint8)
    for off in ggml_type(type_name).scale_fields:
        v = (rng.uniform(0.2, 1.0, size=blocks.shape[0]) * 0.02).astype(np.float16)
        blocks[:, off:off + 2] = v.view(np.uint8).reshape(-1, 2)
    return QuantizedTensor(f"bench.{type_name}", type_name, (n, k), torch.from_numpy(blocks.reshape(-1)), "bench")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qtype", default="Q4_K")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--isa", default=None, help="avx2, avx512 (default: the best the CPU has, AMX excluded)")
    ap.add_argument("--repeats", type=int, default=200, help="calls per round")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--save", help="write the outputs of a fixed input here")
    ap.add_argument("--check", help="compare the outputs of that fixed input to this file, bit for bit")
    args = ap.parse_args()

    isa = args.isa or select_isa()
    if isa == "amx":
        isa = "avx512"  # decode (m = 1) runs the integer-dot kernels anyway
    rt = kernels().Runtime(1, isa, False)
    (pm,) = repack.pack_matrices(random_matrix(args.qtype, args.rows, args.k))
    gen = torch.Generator().manual_seed(1)

    # fixed inputs for --save / --check: m = 1 (decode) and m = 4 (the token tiles)
    outs = {}
    for m in (1, 3, 4):
        x = torch.randn(m, args.k, generator=gen)
        y = torch.empty(m, args.rows)
        rt.linear(pm, m, x.data_ptr(), y.data_ptr())
        outs[m] = y
    if args.save:
        torch.save(outs, args.save)
    if args.check:
        ref = torch.load(args.check)
        same = all(torch.equal(outs[m], ref[m]) for m in ref)
        diff = max(float((outs[m] - ref[m]).abs().max()) for m in ref)
        print(f"outputs vs {args.check}: {'bit-identical' if same else f'DIFFER (max abs diff {diff:.3g})'}")

    x = torch.randn(1, args.k, generator=gen)
    y = torch.empty(1, args.rows)
    xp, yp = x.data_ptr(), y.data_ptr()
    for _ in range(args.repeats):
        rt.linear(pm, 1, xp, yp)
    cpu, wall = [], []
    for _ in range(args.rounds):
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        for _ in range(args.repeats):
            rt.linear(pm, 1, xp, yp)
        cpu.append((time.thread_time_ns() - c0) / args.repeats)
        wall.append((time.perf_counter_ns() - t0) / args.repeats)
    ns = statistics.median(cpu)
    print(f"{args.qtype} {args.rows} x {args.k}, isa {rt.isa}, 1 thread, packed {pm.nbytes / 1024:.0f} KiB: "
          f"{ns / 1000:.1f} us CPU per call (min {min(cpu) / 1000:.1f}; wall {statistics.median(wall) / 1000:.1f}), "
          f"{ns / args.rows:.1f} ns per row, {args.rows * args.k / ns:.2f} weights per ns")


if __name__ == "__main__":
    main()
