"""MoE-layer decode and prefill throughput of kt-cpu-amx's KExpertsCPU on a DeepSeek-V2-Lite-shaped layer
(64 experts, 6 active, hidden 2048, moe_intermediate 1408), against KExpertsTorch on the same dequantized
weights and against llama.cpp (CPU only, same threads) on the same GGUF.

The layer comes from a synthetic GGUF (``ktcore.weights.gguf_writer.write_synthetic_moe_gguf``: layer 0
dense, layer 1 MoE). llama.cpp runs whole models, so its MoE-layer time is estimated as the time of the
2-layer model minus that of the 1-layer (dense only) model, same threads, same batch.
Decode bandwidth: bytes of the 6 chosen experts' packed weights per token, against a measured read
bandwidth (a large torch sum on the same threads).

    python bench/bench_cpu_experts.py --threads 2 --qtype Q4_0 [--no-llama-cpp] [--no-torch] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

E, K_ACTIVE, H, I = 64, 6, 2048, 1408


class ExpertsShape(nn.Module):
    """What an experts op reads from the Transformers module it replaces."""

    def __init__(self):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = E, H, I
        self.act_fn = nn.SiLU()


def routing(tokens: int, gen: torch.Generator):
    idx = torch.stack([torch.randperm(E, generator=gen)[:K_ACTIVE] for _ in range(tokens)])
    w = torch.softmax(torch.randn(tokens, K_ACTIVE, generator=gen), -1)
    x = torch.randn(tokens, H, generator=gen) * 0.5
    return x, idx, w


def time_op(op, tokens: int, reps: int, warmup: int = 2) -> float:
    """Median seconds per forward over ``reps`` calls with fresh routing each time."""
    gen = torch.Generator().manual_seed(tokens)
    inputs = [routing(tokens, gen) for _ in range(reps + warmup)]
    times = []
    for i, (x, idx, w) in enumerate(inputs):
        t0 = time.perf_counter()
        op(x, idx, w)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth(threads: int, mib: int = 1024) -> float:
    """GB/s of a large float32 sum (read-only stream) on ``threads`` torch threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a = torch.ones(mib * 2**20 // 4)
    a.sum()
    best = min(_timed(a.sum) for _ in range(5))
    torch.set_num_threads(old)
    return a.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def llama_cpp_times(path1: str, path2: str, threads: int, prefill: int, decode_steps: int) -> dict:
    """Seconds per decode token and per prefill of ``prefill`` tokens, 2-layer minus 1-layer model."""
    import llama_cpp

    def measure(path):
        llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=prefill + decode_steps + 8,
                              n_batch=prefill, n_ubatch=prefill, n_gpu_layers=0, verbose=False, logits_all=False,
                              # V2-Lite has no q LoRA; the synthetic file omits the key llama.cpp requires
                              kv_overrides={"deepseek2.attention.q_lora_rank": 0})
        toks = [int(t) for t in torch.randint(3, 1000, (prefill,), generator=torch.Generator().manual_seed(0))]
        llm.reset()
        llm.eval(toks[:8])  # warm-up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(toks)
        t_prefill = time.perf_counter() - t0
        steps = []
        for j in range(decode_steps):
            t0 = time.perf_counter()
            llm.eval([toks[j]])
            steps.append(time.perf_counter() - t0)
        del llm
        return t_prefill, statistics.median(steps)

    p1, d1 = measure(path1)
    p2, d2 = measure(path2)
    return {"prefill_s": max(p2 - p1, 1e-9), "decode_s": max(d2 - d1, 1e-9), "whole_2layer_prefill_s": p2,
            "whole_2layer_decode_s": d2}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--qtype", default="Q4_0", help="experts' GGML type (Q4_K's down_proj falls back to Q8_0: 1408 %% 256)")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode-reps", type=int, default=20)
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--isa", default=None, help="force avx2/avx512/amx (default: best)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from kt_cpu_amx import get_runtime
    from kt_cpu_amx.ops import KExpertsCPU
    from ktcore.weights import open_source
    from ktcore.weights.gguf_writer import write_synthetic_moe_gguf

    torch.set_num_threads(args.threads)
    os.environ["KT_CPU_THREADS"] = str(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kt-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    path2 = str(workdir / f"moe2-{args.qtype}.gguf")
    path1 = str(workdir / f"moe1-{args.qtype}.gguf")
    if not os.path.exists(path2):
        write_synthetic_moe_gguf(path2, layers=2, qtype=args.qtype)
    if not os.path.exists(path1):
        write_synthetic_moe_gguf(path1, layers=1, qtype=args.qtype)

    source = open_source(path2)
    prefix = "model.layers.1.mlp.experts"
    weights = {n: source.get(f"{prefix}.{n}") for n in ("gate_proj", "up_proj", "down_proj")}
    types = {n: q.ggml_type for n, q in weights.items()}
    ours = KExpertsCPU(ExpertsShape(), isa=args.isa, threads=args.threads)
    t0 = time.perf_counter()
    ours.load(weights)
    load_s = time.perf_counter() - t0
    rt = get_runtime(args.threads, args.isa)
    gguf_bytes_per_expert = sum(q.data.numel() for q in weights.values()) / E
    packed_bytes_per_expert = ours.layer.expert_nbytes

    result = {"threads": args.threads, "isa": rt.isa, "types": types, "load_s": load_s, "prefill_tokens": args.prefill}
    bw = read_bandwidth(args.threads)
    result["read_bandwidth_GBps"] = bw

    dec = time_op(ours, 1, args.decode_reps)
    pre = time_op(ours, args.prefill, args.prefill_reps, warmup=1)
    result["kt_decode_s"] = dec
    result["kt_prefill_s"] = pre
    result["kt_decode_tok_s"] = 1 / dec
    result["kt_prefill_tok_s"] = args.prefill / pre
    touched = K_ACTIVE * gguf_bytes_per_expert
    result["decode_GBps_gguf_bytes"] = touched / dec / 1e9
    result["decode_GBps_packed_bytes"] = K_ACTIVE * packed_bytes_per_expert / dec / 1e9
    result["decode_fraction_of_bandwidth_bound"] = (K_ACTIVE * packed_bytes_per_expert / bw / 1e9) / dec
    result["decode_fraction_of_bound_gguf_bytes"] = (touched / bw / 1e9) / dec

    if not args.no_torch:
        from ktcore.builtin.experts import KExpertsTorch

        ref = KExpertsTorch(ExpertsShape(), dtype=torch.float32)
        ref.load(weights)
        result["torch_decode_s"] = time_op(ref, 1, max(3, args.decode_reps // 4))
        result["torch_prefill_s"] = time_op(ref, args.prefill, 1, warmup=1)
        result["speedup_vs_torch_decode"] = result["torch_decode_s"] / dec
        result["speedup_vs_torch_prefill"] = result["torch_prefill_s"] / pre
        del ref

    if not args.no_llama_cpp:
        try:
            lc = llama_cpp_times(path1, path2, args.threads, args.prefill, max(8, args.decode_reps))
        except Exception as exc:  # reported, not hidden: llama.cpp may be absent or refuse the file
            result["llama_cpp_error"] = f"{type(exc).__name__}: {exc}"
        else:
            result.update({f"llama_cpp_{k}": v for k, v in lc.items()})
            result["speedup_vs_llama_cpp_decode"] = lc["decode_s"] / dec
            result["speedup_vs_llama_cpp_prefill"] = lc["prefill_s"] / pre

    for k, v in result.items():
        print(f"{k:40s} {v:.4g}" if isinstance(v, float) else f"{k:40s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
