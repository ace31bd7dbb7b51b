"""KLinearMarlin (kt-cuda's Triton int4 GEMM) against torch's half-precision matmul, on one CUDA GPU.

    python bench/bench_marlin.py                 # the table: batch 1, 4, 16 on the three Llama-8B-like shapes
    python bench/bench_marlin.py --sweep         # also time every candidate tile config, print the best per case
    python bench/bench_marlin.py --extras        # also GGUF dequant, MoE experts and FP8 timings
    python bench/bench_marlin.py --precompile 15 --kernels --skip-table --sweep-tsv sweep.tsv
                                                 # every word-kernel config (kernel_configs), compiled first
                                                 # in 15 processes; best five per case, all timings in the TSV
    python bench/bench_marlin.py --precompile 15 --kernels --skip-table --batches 16 --only wtc,wdot \
        --sweep-tsv sweep.tsv                    # the same for 16 rows and the tensor-core kernels only

Shapes are ``in x out`` (K x N). Each case times, with CUDA events:
- ``graph``: the median over replays of a CUDA graph holding ``--calls`` calls, rotating among enough
  weight copies that they do not fit in L2 (GPU time per call, launch gaps removed);
- ``eager``: the median of per-call events around plain calls (what an uncaptured decode step pays).
Int4 variants: ``g128`` (symmetric, fp16 scales, as Marlin benchmarks), ``q4k`` (a GGUF Q4_K tensor
repacked losslessly: group 32, float32 scale and min), ``q4k16`` (the same with float16 scales) and
``q4k16K`` (that one with K-major packed bytes). KLinearMarlin's kernel and tile are autotuned per case
(``kt_cuda.triton_int4.tuned_config``); the sweep shows the candidates.
Every variant is also checked against the fp16 product of its own dequantized weight.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import ktcore  # noqa: F401,E402  (before torch: the OpenMP wait policy ktcore sets, see ktcore/__init__.py)
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "kt_cuda"))

from kt_cuda import int4  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
BATCHES = [1, 4, 16]
L2_BYTES = 60 * 2**20


def _copies(nbytes: int) -> int:
    return max(2, min(32, -(-3 * L2_BYTES // max(nbytes, 1))))


def time_graph(fns, calls: int, replays: int = 15) -> float:
    """Median microseconds per call over replays of a graph of ``calls`` calls cycling through ``fns``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns[:3]:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def time_eager(fns, reps: int = 100) -> float:
    for f in fns[:3]:
        f()
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fns[i % len(fns)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def q4k_weight(N: int, K: int, device, scales_dtype="auto") -> int4.Int4Weight:
    """Random valid Q4_K blocks (6-bit scales/mins, small float16 super-scales) repacked."""
    n_blocks = N * K // 256
    raw = torch.randint(0, 256, (n_blocks, 144), dtype=torch.uint8, device=device)
    halves = (torch.rand(n_blocks, 2, device=device) * 2e-3 + 1e-4).half()
    raw[:, 0:4] = halves.view(torch.uint8).view(n_blocks, 4)
    return int4.from_ggml(raw.reshape(-1), "Q4_K", (N, K), scales_dtype)


def variants(N: int, K: int, device):
    w = torch.randn(N, K, device=device) * 0.02
    q4k16 = q4k_weight(N, K, device, torch.float16)
    return {
        "g128": int4.quantize(w, 128, symmetric=True, scales_dtype=torch.float16),
        "q4k": q4k_weight(N, K, device),
        "q4k16": q4k16,
        "q4k16K": int4.with_layout(q4k16, True),
    }


def check(x, w, out) -> float:
    ref = F.linear(x.float(), w.dequantize(torch.float32))
    return ((out.float() - ref).norm() / ref.norm()).item()


def bench_table(args, device) -> list[str]:
    from kt_cuda.triton_int4 import int4_matmul

    dtype = torch.float16
    rows = []
    header = f"{'K x N':>13} {'M':>3} | {'fp16 graph':>10} {'eager':>7} | " + " | ".join(
        f"{v + ' graph':>12} {'x':>5} {'eager':>7} {'x':>5}" for v in ("g128", "q4k", "q4k16", "q4k16K")) + " | max rel err"
    rows.append(header)
    rows.append("-" * len(header))
    for K, N in SHAPES:
        base = torch.randn(N, K, device=device, dtype=dtype) * 0.02
        dense = [base.clone() for _ in range(_copies(base.numel() * 2))]
        ws = variants(N, K, device)
        for M in BATCHES:
            x = torch.randn(M, K, device=device, dtype=dtype)
            fp16_fns = [lambda d=d: F.linear(x, d) for d in dense]
            t_fp16_g = time_graph(fp16_fns, args.calls)
            t_fp16_e = time_eager(fp16_fns)
            cells, errs = [], []
            for name, w in ws.items():
                errs.append(check(x, w, int4_matmul(x, w)))
                copies = [w] + [_clone(w) for _ in range(_copies(w.nbytes()) - 1)]
                fns = [lambda c=c: int4_matmul(x, c) for c in copies]
                tg, te = time_graph(fns, args.calls), time_eager(fns)
                cells.append(f"{tg:10.1f}us {t_fp16_g / tg:4.2f}x {te:6.1f}us {t_fp16_e / te:4.2f}x")
                del copies, fns
            rows.append(f"{K:>6}x{N:<6} {M:>3} | {t_fp16_g:8.1f}us {t_fp16_e:6.1f}us | " + " | ".join(cells)
                        + f" | {max(errs):.1e}")
            print(rows[-1], flush=True)
        del dense, ws
        torch.cuda.empty_cache()
    return rows


def _clone(w: int4.Int4Weight) -> int4.Int4Weight:
    return int4.Int4Weight(w.qweight.clone(), w.scales.clone(), None if w.mins is None else w.mins.clone(),
                           w.group_size, w.zero_point)


def sweep_candidates(M: int, group_size: int, k_major: bool = False):
    from kt_cuda.triton_int4 import Int4Config as C, candidates

    extra = {1: [C("gemv", 16, 512, 4), C("gemv", 32, 256, 4), C("gemv", 64, 256, 4), C("gemv", 8, 256, 4), C("gemv", 32, 512, 1)],
             16: [C("gemm", 32, 256, 4), C("gemm", 64, 128, 2), C("gemm", 128, 128, 2)]}.get(M, [])
    return candidates(M, group_size, k_major) + [c for c in extra if c.block_k % group_size == 0]


def sweep(args, device) -> list[str]:
    """Candidate configs per (shape, M, layout) on the q4k16 weights (the GGUF case): fastest three each,
    against the fp16 baseline; N-major and K-major packed bytes."""
    from kt_cuda.triton_int4 import int4_matmul

    out = []
    for K, N in SHAPES:
        base = torch.randn(N, K, device=device, dtype=torch.float16) * 0.02
        dense = [base] + [base.clone() for _ in range(_copies(base.numel() * 2) - 1)]
        w0 = variants(N, K, device)["q4k16"]
        for M in (1, 16, 256):
            x = torch.randn(M, K, device=device, dtype=torch.float16)
            t16 = time_graph([lambda d=d: F.linear(x, d) for d in dense], 20, 7)
            for k_major in (False, True):
                w = int4.with_layout(w0, k_major)
                copies = [w] + [_clone(w) for _ in range(_copies(w.nbytes()) - 1)]
                results = []
                for cfg in sweep_candidates(M, w.group_size, k_major):
                    try:
                        err = check(x, w, int4_matmul(x, w, None, cfg))
                        t = time_graph([lambda c=c, cfg=cfg: int4_matmul(x, c, None, cfg) for c in copies], 20, 7)
                    except Exception as exc:  # a config the compiler rejects (resources): report, go on
                        out.append(f"  {K}x{N} M={M} {cfg.label()}: {type(exc).__name__}: {str(exc)[:120]}")
                        print(out[-1], flush=True)
                        continue
                    results.append((t, cfg, err))
                results.sort(key=lambda r: r[0])
                line = (f"sweep {K:>5}x{N:<5} M={M:<4} {'K-major' if k_major else 'N-major'} fp16 {t16:7.1f}us | best: "
                        + "; ".join(f"{c.label()} {t:.1f}us ({t16 / t:.2f}x) e{e:.0e}" for t, c, e in results[:3]))
                out.append(line)
                print(line, flush=True)
                del copies
        del dense
        torch.cuda.empty_cache()
    return out


def kernel_configs(M: int):
    """The word-kernel configurations (and one byte-kernel baseline) timed by ``--kernels`` for ``M`` rows."""
    from kt_cuda.triton_int4 import Int4Config as C

    if M == 1:
        out = [C("wgemv", bn, bk, 1, nw, 3, block_m=1) for bn, bk, nw in [(4, 1024, 2), (8, 1024, 4)]]
        out += [C("a8gemv", bn, bk, sk, nw, 3, block_m=1, prefetch=pf) for bn, bk, sk, nw, pf in
                [(4, 1024, 1, 4, False), (8, 1024, 1, 8, False), (8, 512, 1, 4, False), (4, 1024, 1, 4, True),
                 (8, 1024, 1, 8, True), (8, 512, 1, 4, True), (16, 512, 1, 8, True), (4, 2048, 1, 4, True),
                 (8, 2048, 1, 8, True), (2, 2048, 1, 4, True), (16, 1024, 1, 8, True), (32, 512, 1, 8, True)]]
        out += a8one_configs(1)
    elif M <= 4:
        out = [C("wgemv", 8, 512, 1, 4, 3, block_m=4)]
        out += [C("a8gemv", bn, bk, 1, nw, 3, block_m=4, prefetch=pf) for bn, bk, nw, pf in
                [(8, 1024, 4, False), (16, 512, 8, False), (8, 1024, 8, True), (16, 512, 8, True), (8, 512, 4, True),
                 (16, 1024, 8, True)]]
        out += a8one_configs(4)
    else:
        bm = 16 if M <= 16 else 32
        out = [C("wdot", bn, bk, sk, 4, 3, block_m=bm, swap=sw) for bn, bk, sk, sw in
               [(32, 256, 2, False), (64, 256, 1, True), (32, 256, 1, False)]]
        if M <= 16:
            out += [C("a8gemv", bn, bk, 1, nw, 3, block_m=bm) for bn, bk, nw, bm in
                    [(8, 512, 4, 8), (16, 256, 4, 8), (16, 256, 4, 16), (8, 512, 8, 16), (16, 512, 8, 16), (32, 256, 8, 16)]]
        out += wtc_configs(M)
    return out


# a8one tiles (block_n, block_k, split_k, num_warps, prefetch): the activation rounding is repeated by every
# program along N, block_m * block_k values per tile against block_n * block_k / 8 weight words, so wide N
# tiles (16-64) with split K (in-kernel, still one launch) to keep enough programs, and a few narrow ones
A8ONE_TILES = {
    1: [(8, 1024, 1, 4, True), (16, 1024, 1, 8, True), (16, 512, 1, 4, True), (32, 512, 1, 8, True),
        (32, 512, 2, 8, True), (32, 1024, 2, 8, True), (32, 512, 4, 8, True), (16, 512, 2, 4, True),
        (16, 1024, 2, 8, True), (8, 1024, 2, 4, True), (8, 2048, 2, 8, True), (4, 2048, 1, 4, True),
        (4, 1024, 2, 2, True), (16, 2048, 4, 8, True), (32, 1024, 4, 8, True), (8, 512, 4, 4, True),
        (64, 512, 4, 8, True), (32, 2048, 8, 8, True), (16, 1024, 1, 8, False), (32, 512, 2, 8, False)],
    4: [(8, 1024, 1, 4, True), (16, 512, 1, 8, True), (16, 1024, 1, 8, True), (32, 512, 1, 8, True),
        (32, 512, 2, 8, True), (16, 512, 2, 4, True), (8, 1024, 2, 4, True), (32, 1024, 2, 8, True),
        (16, 1024, 4, 8, True), (32, 512, 4, 8, True), (64, 512, 2, 8, True), (8, 512, 1, 4, True),
        (16, 512, 1, 8, False)],
}


def a8one_configs(M: int):
    """``a8one`` (``kt_cuda.triton_w4_one``: rounding and split K inside one launch) configs for 1-4 rows."""
    from kt_cuda.triton_int4 import Int4Config as C

    bm = 1 if M == 1 else 4
    return [C("a8one", bn, bk, sk, nw, 3, block_m=bm, prefetch=pf) for bn, bk, sk, nw, pf in A8ONE_TILES[bm]]


# wtc tiles (block_n, block_k, split_k, num_warps, num_stages, swap): swapped operands (weight rows as the
# wgmma M side, 64-128 per program) and plain ones (16-64 weight rows as the mma N side), split K 1-8.
WTC_TILES = [
    (64, 256, 4, 4, 4, True), (64, 256, 2, 4, 4, True), (64, 128, 4, 4, 6, True), (64, 512, 2, 4, 3, True),
    (128, 256, 4, 8, 4, True), (128, 128, 8, 8, 4, True), (64, 256, 8, 4, 3, True),
    (32, 256, 2, 4, 4, False), (32, 256, 4, 4, 4, False), (16, 256, 4, 2, 4, False), (32, 512, 1, 4, 3, False),
    (16, 512, 2, 2, 3, False), (64, 256, 2, 4, 4, False),
    # 128-wide K tiles: about half the registers of the 256-wide ones (98-126 against 150-226 for sm_90 in
    # Triton 3.9), so 3-4 programs per SM instead of 2
    (64, 128, 2, 4, 6, True), (64, 128, 8, 4, 4, True), (128, 128, 4, 8, 5, True), (32, 128, 2, 4, 6, False),
    (32, 128, 4, 4, 6, False),
    # every program reads the activation tile of its K range from L2: 128 weight rows per program halve
    # that traffic against 64 (and quarter it against 32)
    (128, 128, 4, 4, 4, True), (64, 128, 4, 4, 8, True), (128, 128, 2, 8, 6, True),
]


def wtc_configs(M: int):
    """``wtc`` (``kt_cuda.triton_w4_tc``) configs for 5-32 rows: every tile with the half and f32 unpacks."""
    from kt_cuda.triton_int4 import Int4Config as C

    bm = 16 if M <= 16 else 32
    out = []
    for unpack in ("half", "f32"):
        out += [C("wtc", bn, bk, sk, nw, st, block_m=bm, swap=sw, unpack=unpack) for bn, bk, sk, nw, st, sw in WTC_TILES]
    return out


def _selected(configs, kernels):
    """``configs`` whose kernel is in ``kernels`` (None: all)."""
    return [c for c in configs if kernels is None or c.kernel in kernels]


def _compile_jobs(jobs):
    """Worker: run each (variant, M, config) once on 4096x4096 (same Triton specializations as the bench
    shapes), so that the kernels land in Triton's on-disk cache before the timed process needs them."""
    import torch as _torch

    from kt_cuda.triton_int4 import int4_matmul

    dev = _torch.device("cuda")
    _torch.manual_seed(0)
    ws = variants(4096, 4096, dev)
    failed = []
    for name, M, cfg in jobs:
        x = _torch.randn(M, 4096, device=dev, dtype=_torch.float16)
        try:
            int4_matmul(x, ws[name], None, cfg)
        except Exception as exc:  # reported by the timed pass too
            failed.append(f"{name} M={M} {cfg.label()}: {type(exc).__name__}: {str(exc)[:160]}")
    _torch.cuda.synchronize()
    return failed


def precompile(workers: int = 14, batches=None, kernels=None, table: bool = True) -> list[str]:
    """Compile every configuration the sweep (``kernels``: only those kernels) and, with ``table``, the
    table can launch, in parallel processes."""
    import multiprocessing as mp

    from kt_cuda.triton_int4 import candidates

    jobs = []
    for M in batches or BATCHES:
        jobs += [("q4k16", M, c) for c in _selected(kernel_configs(M), kernels)]
        for name in ("g128", "q4k", "q4k16", "q4k16K") if table else ():
            g = 128 if name == "g128" else 32
            jobs += [(name, M, c) for c in candidates(M, g, name.endswith("K")) if c.kernel != "dense"]
    chunks = [jobs[i::workers] for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        failed = sum(pool.map(_compile_jobs, chunks), [])
    return [f"precompiled {len(jobs)} launches in {workers} processes"] + [f"compile failed: {f}" for f in failed]


def kernel_sweep(args, device) -> list[str]:
    """Every ``kernel_configs`` entry on the q4k16 weights of each shape and batch: checked against the fp32
    product of the dequantized weight, timed in CUDA graphs (weights rotated past L2) against fp16.
    Prints the best five per case; every timing goes to ``--sweep-tsv``."""
    from kt_cuda.triton_int4 import int4_matmul

    out, tsv = [], ["K\tN\tM\tconfig\tus\tfp16_us\tratio\trel_err"]
    for K, N in SHAPES:
        base = torch.randn(N, K, device=device, dtype=torch.float16) * 0.02
        dense = [base] + [base.clone() for _ in range(_copies(base.numel() * 2) - 1)]
        w = q4k_weight(N, K, device, torch.float16)
        copies = [w] + [_clone(w) for _ in range(_copies(w.nbytes()) - 1)]
        for M in args.batches or BATCHES:
            x = torch.randn(M, K, device=device, dtype=torch.float16)
            t16 = time_graph([lambda d=d: F.linear(x, d) for d in dense], 20, 7)
            ref = F.linear(x.float(), w.dequantize(torch.float32))
            results = []
            for cfg in _selected(kernel_configs(M), args.only):
                try:
                    err = ((int4_matmul(x, w, None, cfg).float() - ref).norm() / ref.norm()).item()
                    t = time_graph([lambda c=c, cfg=cfg: int4_matmul(x, c, None, cfg) for c in copies], 20, 7)
                except Exception as exc:
                    out.append(f"  {K}x{N} M={M} {cfg.label()}: {type(exc).__name__}: {str(exc)[:120]}")
                    print(out[-1], flush=True)
                    continue
                results.append((t, cfg, err))
                tsv.append(f"{K}\t{N}\t{M}\t{cfg.label()}\t{t:.2f}\t{t16:.2f}\t{t16 / t:.3f}\t{err:.1e}")
            results.sort(key=lambda r: r[0])
            bad = [f"{c.label()} e{e:.0e}" for _, c, e in results if not e < (2e-2 if c.kernel in ("a8gemv", "a8one") else 5e-3)]
            gbs = w.nbytes() / (results[0][0] * 1e-6) / 1e9 if results else 0.0
            line = (f"kern {K:>5}x{N:<5} M={M:<2} fp16 {t16:6.1f}us | " +
                    "; ".join(f"{c.label()} {t:.1f}us {t16 / t:.2f}x" for t, c, e in results[:5])
                    + f" | best {gbs:.0f} GB/s" + (f" | BAD ERR: {bad}" if bad else ""))
            out.append(line)
            print(line, flush=True)
        del dense, copies
        torch.cuda.empty_cache()
    if args.sweep_tsv:
        Path(args.sweep_tsv).write_text("\n".join(tsv) + "\n")
    return out


def extras(args, device) -> list[str]:
    """GGUF dequant (Triton vs ktcore's torch), MoE experts (KExpertsGPU vs torch loop), FP8 GEMM."""
    out = []
    from kt_cuda.triton_dequant import dequantize as triton_dequantize
    from ktcore.weights.dequant import dequantize_raw

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    N, K = 14336, 4096
    for t in ("Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"):
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[t]]
        n_blocks = N * K // block
        raw = torch.randint(0, 256, (n_blocks, size), dtype=torch.uint8, device=device)
        half_at = {"Q4_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[t]
        for off in half_at:
            raw[:, off:off + 2] = (torch.rand(n_blocks, 1, device=device) * 1e-3).half().view(torch.uint8)
        raw = raw.reshape(-1)
        tri = triton_dequantize(raw, t, (N, K), torch.bfloat16)
        ref = dequantize_raw(raw, t, (N, K), torch.bfloat16)
        same = torch.equal(tri, ref)
        t_tri = time_eager([lambda: triton_dequantize(raw, t, (N, K), torch.bfloat16)], 20)
        from ktcore.weights import dequant as _dq

        saved = dict(_dq._FAST)
        _dq._FAST.clear()
        t_ref = time_eager([lambda: dequantize_raw(raw, t, (N, K), torch.bfloat16)], 20)
        _dq._FAST.update(saved)
        gbs = (raw.numel() + N * K * 2) / (t_tri * 1e-6) / 1e9
        out.append(f"dequant {t:5} {K}x{N} -> bf16: triton {t_tri:8.1f}us ({gbs:5.0f} GB/s)  ktcore torch {t_ref:8.1f}us  "
                   f"speedup {t_ref / t_tri:5.1f}x  identical={same}")
        print(out[-1], flush=True)

    # MoE: DeepSeek-V2-Lite routed experts (64 experts, hidden 2048, intermediate 1408, top-6), Q4_K
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Experts

    from ktcore.builtin.experts import KExpertsTorch
    from ktcore.weights.tensor import QuantizedTensor
    from kt_cuda.ops import KExpertsGPU

    E, H, I, top_k = 64, 2048, 1408, 6
    cfg = DeepseekV2Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=top_k)
    with torch.device("meta"):
        module = DeepseekV2Experts(cfg).to(torch.bfloat16)

    def q4k(shape, name):
        n_blocks = shape[0] * shape[1] * shape[2] // 256
        raw = torch.randint(0, 256, (n_blocks, 144), dtype=torch.uint8)
        raw[:, 0:4] = (torch.rand(n_blocks, 2) * 2e-3 + 1e-4).half().view(torch.uint8).view(n_blocks, 4)
        return QuantizedTensor(name, "Q4_K", shape, raw.reshape(-1), "bench")

    def q4_0(shape, name):  # 1408 columns take no 256-blocks: llama.cpp falls back to a 32-block type there
        n_blocks = shape[0] * shape[1] * shape[2] // 32
        raw = torch.randint(0, 256, (n_blocks, 18), dtype=torch.uint8)
        raw[:, 0:2] = (torch.rand(n_blocks, 1) * 2e-3 + 1e-4).half().view(torch.uint8)
        return QuantizedTensor(name, "Q4_0", shape, raw.reshape(-1), "bench")

    weights = {"gate_proj": q4k((E, I, H), "gate"), "up_proj": q4k((E, I, H), "up"), "down_proj": q4_0((E, H, I), "down")}
    gpu = KExpertsGPU(module, device)
    gpu.load(weights)
    ref_op = KExpertsTorch(module, device, dtype=torch.bfloat16)
    ref_op.load(weights)
    for T in (1, 16, 512):
        x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
        idx = torch.stack([torch.randperm(E, device=device)[:top_k] for _ in range(T)])
        wts = torch.rand(T, top_k, device=device)
        a, b = gpu(x, idx, wts), ref_op(x, idx, wts)
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        t_gpu = time_eager([lambda: gpu(x, idx, wts)], 30)
        t_ref = time_eager([lambda: ref_op(x, idx, wts)], 10)
        out.append(f"moe V2-Lite Q4_K/Q4_0 T={T:<4} KExpertsGPU {t_gpu:8.1f}us  KExpertsTorch(bf16, cuda) {t_ref:8.1f}us  "
                   f"speedup {t_ref / t_gpu:5.1f}x  rel err {err:.1e}")
        print(out[-1], flush=True)
    del gpu, ref_op

    # FP8 block GEMM vs bf16 matmul (DeepSeek-V3 o_proj-like 16384 -> 7168 and 7168 -> 18432 MLP)
    from kt_cuda import fp8
    from kt_cuda.triton_fp8 import fp8_block_matmul

    for K, N in ((7168, 18432), (16384, 7168)):
        w = torch.randn(N, K, device=device) * 0.02
        wq, ws = fp8.quantize_weight(w)
        wb = w.to(torch.bfloat16)
        for M in (1, 16, 256):
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            y = fp8_block_matmul(x, wq, ws)
            ref = F.linear(x.float(), w)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            t8 = time_graph([lambda: fp8_block_matmul(x, wq, ws)], 20, 7)
            tb = time_graph([lambda: F.linear(x, wb)], 20, 7)
            out.append(f"fp8 {K}x{N} M={M:<3} triton fp8 {t8:8.1f}us  bf16 {tb:8.1f}us  ratio {tb / t8:4.2f}x  rel err vs fp32 {err:.1e}")
            print(out[-1], flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=50, help="calls per captured graph")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--extras", action="store_true")
    parser.add_argument("--skip-table", action="store_true")
    parser.add_argument("--kernels", action="store_true", help="time every word-kernel config (kernel_configs)")
    parser.add_argument("--precompile", type=int, default=0, help="compile all configs first in N processes")
    parser.add_argument("--sweep-tsv", default=None, help="--kernels: write every timing here")
    parser.add_argument("--batches", default=None, type=lambda s: [int(v) for v in s.split(",")],
                        help="--kernels / --precompile: only these row counts (e.g. 16 or 16,32)")
    parser.add_argument("--only", default=None, type=lambda s: set(s.split(",")),
                        help="--kernels / --precompile: only these kernels (e.g. wtc,wdot); fp16 is always timed")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available: nothing to benchmark")
        return 1
    device = torch.device("cuda")
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(device)
    import triton

    lines = [f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}"]
    print(lines[0], flush=True)
    if args.precompile:
        lines += precompile(args.precompile, args.batches, args.only, table=not args.skip_table)
        print("\n".join(lines[1:]), flush=True)
    if args.kernels:
        lines += kernel_sweep(args, device)
    if args.sweep:
        lines += sweep(args, device)
    if args.extras:
        lines += extras(args, device)
    if not args.skip_table:
        lines += bench_table(args, device)
    report = "\n".join(lines)
    print("\n" + report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
