"""MoE-layer decode and prefill time of kt-cpu-amx's KExpertsCPU on a DeepSeek-V2-Lite-shaped layer (64 experts,
6 active, hidden 2048, moe_intermediate 1408), per token count, against in the same run:

- kt-kernel (KTransformers' CPU kernels, PyPI ``kt-kernel``): its GGUF method (LLAMAFILE, the same GGUF blocks) and
  its AMXINT4 / AMXINT8 methods (the layer's dequantized weights requantized by kt-kernel at load: lossy, so each
  row also gives its error against the torch reference), each at its best thread count of ``--kt-kernel-threads``;
- KExpertsTorch on the same dequantized weights (``--torch``);
- llama.cpp (CPU only, same threads) on the same GGUF (``--llama-cpp``): its MoE-layer time is the 2-layer
  model's minus the 1-layer (dense only) model's, same threads, same batch.

kt-kernel is loaded from its package directory (an installed ``kt_kernel`` or ``--kt-kernel DIR``, e.g. an unpacked
wheel) by its compiled extension alone (``_kt_kernel_ext_<variant>*.so``, no CUDA needed), the variant matching the
ISA ktcore runs. A method that cannot run here is a row saying why. Ratios are peer time / ktcore time (> 1: ktcore
is faster).

The layer comes from a synthetic GGUF (``ktcore.weights.gguf_writer.write_synthetic_moe_gguf``: layer 0 dense,
layer 1 MoE). With Q4_K and moe_intermediate 1408 the down projection is Q8_0 (1408 is no multiple of 256), and
kt-kernel's GGUF method refuses 1408: ``--inter 1536`` gives an all-Q4_K layer it takes.

    python bench/bench_cpu_experts.py --threads 16 --qtype Q4_K --tokens 1,32,128,512 \\
        [--kt-kernel DIR] [--kt-kernel-threads 16,12,8] [--inter 1536] [--torch] [--llama-cpp] [--json out.json]

``--iq-types [IQ1_S,...]`` (default: every i-quant the kernels keep as blocks) instead times one layer of the same
shape per type, random valid blocks, against Q4_K in the same run: decode (1 token) and prefill (``--iq-prefill``
tokens) ms, the bytes of one expert, and the output error against the torch reference on the blocks' gguf-py
values. The i-quants' super-block is 256: a moe_intermediate that is no multiple of it is rounded up (1408 -> 1536).

    python bench/bench_cpu_experts.py --threads 2 --iq-types
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ktcore  # noqa: F401,E402  (before torch: the OpenMP wait policy ktcore sets, see ktcore/__init__.py)
import torch
from torch import nn

E, K_ACTIVE, H = 64, 6, 2048
KT_KERNEL_METHODS = ("LLAMAFILE", "AMXINT4", "AMXINT8")


class ExpertsShape(nn.Module):
    """What an experts op reads from the Transformers module it replaces."""

    def __init__(self, inter: int):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = E, H, inter
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


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


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


# ------------------------------------------------------------------------------------------------ kt-kernel
KT_KERNEL_VARIANTS = {"amx": ("amx", "avx512_vnni", "avx512_base", "avx2"), "avx512": ("avx512_vnni", "avx512_base", "avx2"),
                      "avx2": ("avx2",)}


def load_kt_kernel(directory: str | None, isa: str):
    """kt-kernel's compiled extension (module ``kt_kernel_ext``) from its package directory, or the reason it
    cannot be loaded. Only the extension is imported: the package's Python side wants a CUDA torch."""
    if directory is None:
        spec = importlib.util.find_spec("kt_kernel")
        if spec is None or not spec.submodule_search_locations:
            return None, "kt-kernel is not installed (pip install kt-kernel==0.7.2, or --kt-kernel DIR)"
        directory = spec.submodule_search_locations[0]
    elif os.path.isdir(os.path.join(directory, "kt_kernel")):
        directory = os.path.join(directory, "kt_kernel")
    for variant in KT_KERNEL_VARIANTS[isa]:
        found = glob.glob(os.path.join(directory, f"_kt_kernel_ext_{variant}*.so"))
        if found:
            spec = importlib.util.spec_from_file_location("kt_kernel_ext", found[0])
            ext = importlib.util.module_from_spec(spec)
            sys.modules["kt_kernel_ext"] = ext
            try:
                spec.loader.exec_module(ext)
            except ImportError as exc:
                return None, f"kt-kernel's {variant} extension does not load: {exc}"
            return ext, variant
    return None, f"no kt-kernel extension for {isa} in {directory}"


class KtKernelLayer:
    """One kt-kernel MoE layer on its own CPUInfer pool: ``method`` LLAMAFILE (raw GGUF blocks) or AMXINT4/AMXINT8
    (bf16 weights quantized by kt-kernel at load). Called like an experts op: (x, idx, w) -> out (float32)."""

    def __init__(self, ext, method: str, threads: int, weights: dict, dequantized: dict, inter: int, max_tokens: int):
        cfg = ext.WorkerPoolConfig()
        cfg.subpool_count, cfg.subpool_numa_map, cfg.subpool_thread_count = 1, [0], [threads]
        self.infer = ext.CPUInfer(cfg)
        self.mask = torch.zeros(E, dtype=torch.bool)  # no expert on a GPU
        config = ext.moe.MOEConfig(E, K_ACTIVE, H, inter, self.mask.data_ptr())
        config.layer_idx, config.pool, config.max_len = 0, self.infer.backend_, max_tokens
        names = ("gate_proj", "up_proj", "down_proj")
        self._tmp = None
        if method == "LLAMAFILE":
            if inter % 256:
                raise ValueError(f"kt-kernel's GGUF method needs moe_intermediate % 256 == 0, not {inter} (--inter 1536)")
            self.keep = [weights[n].data.contiguous() for n in names]
            config.m_block, config.group_min_len, config.group_max_len = 32, 10, max_tokens
            config.gate_proj, config.up_proj, config.down_proj = (t.data_ptr() for t in self.keep)
            config.gate_type, config.up_type, config.down_type = (
                getattr(ext.kvcache.ggml_type, weights[n].ggml_type) for n in names)
            config.hidden_type = ext.kvcache.ggml_type.BF16
            self.moe = ext.moe.MOE(config)
            expert_map = torch.arange(E, dtype=torch.int32)
        else:
            self.keep = [dequantized[n].to(torch.bfloat16).contiguous() for n in names]
            config.gate_proj, config.up_proj, config.down_proj = (t.data_ptr() for t in self.keep)
            # online quantization: kt-kernel writes its quantized layer under path
            self._tmp = tempfile.TemporaryDirectory(prefix="kt-kernel-")
            config.save, config.load, config.path = True, False, self._tmp.name
            self.moe = {"AMXINT4": ext.moe.AMXInt4_MOE, "AMXINT8": ext.moe.AMXInt8_MOE}[method](config)
            # its AMX methods read the expert map as int64 (an int32 map leaves experts unloaded: zero outputs)
            expert_map = torch.arange(E, dtype=torch.int64)
        self.infer.submit(self.moe.load_weights_task(expert_map.data_ptr()))
        self.infer.sync()
        self.keep = None if method != "LLAMAFILE" else self.keep

    def __call__(self, x, idx, w):
        T = x.shape[0]
        xb = x.to(torch.bfloat16).contiguous()
        ids, ws = idx.to(torch.int64).contiguous(), w.to(torch.float32).contiguous()
        out = torch.empty(T, H, dtype=torch.bfloat16)
        bsz = torch.tensor([T], dtype=torch.int32)
        self.infer.submit(self.moe.forward_task(bsz.data_ptr(), K_ACTIVE, ids.data_ptr(), ws.data_ptr(),
                                                xb.data_ptr(), out.data_ptr(), False))
        self.infer.sync()
        return out.float()

    def close(self):
        del self.moe, self.infer
        if self._tmp is not None:
            self._tmp.cleanup()


def kt_kernel_rows(ext, args, weights, dequantized, reference, check_input) -> dict:
    """{method: {"ms": {tokens: best median ms}, "threads": {tokens: n}, "rel_err": e} or {"skipped": reason}}."""
    rows = {}
    for method in args.kt_kernel_methods.split(","):
        row = {"ms": {}, "threads": {}}
        try:
            for n in (int(v) for v in args.kt_kernel_threads.split(",")):
                layer = KtKernelLayer(ext, method, n, weights, dequantized, args.inter, max(args.tokens))
                if "rel_err" not in row:
                    row["rel_err"] = rel_err(layer(*check_input), reference)
                for T in args.tokens:
                    ms = 1e3 * time_op(layer, T, args.decode_reps if T == 1 else args.prefill_reps, warmup=1)
                    if T not in row["ms"] or ms < row["ms"][T]:
                        row["ms"][T], row["threads"][T] = ms, n
                layer.close()
        except Exception as exc:  # reported as the row: a method kt-kernel refuses here
            row = {"skipped": f"{type(exc).__name__}: {exc}"}
        rows[method] = row
    return rows


# ------------------------------------------------------------------------------------------------ llama.cpp
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


# ------------------------------------------------------------------------------------------------ i-quants
IQ_TYPES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "MXFP4", "IQ4_NL", "TQ2_0")
ONLINE_SUFFIX = "@int8"  # a row "MXFP4@int8": the type's weights dequantized, then online int8 (the path before the kernels kept the blocks)


def random_layer(qtype: str, inter: int, seed: int, experts: int = E, hidden: int = H) -> dict:
    """gate/up/down of ``experts`` experts as random valid ``qtype`` blocks (scales about 0.02); ``<type>@int8``:
    those weights dequantized to F32 (KExpertsCPU then quantizes them online to int8)."""
    if qtype.endswith(ONLINE_SUFFIX):
        from ktcore.weights.tensor import QuantizedTensor

        blocks = random_layer(qtype[: -len(ONLINE_SUFFIX)], inter, seed, experts, hidden)
        return {n: QuantizedTensor(qt.name, "F32", qt.shape, qt.dequantize(torch.float32).reshape(-1).view(torch.uint8),
                                   "dequantized") for n, qt in blocks.items()}
    import numpy as np

    from ktcore.weights.gguf_writer import random_valid_blocks
    from ktcore.weights.quants import GGML_TYPES
    from ktcore.weights.tensor import QuantizedTensor

    info, rng = GGML_TYPES[qtype], np.random.default_rng(seed)
    out = {}
    for name, shape in (("gate_proj", (experts, inter, hidden)), ("up_proj", (experts, inter, hidden)),
                        ("down_proj", (experts, hidden, inter))):
        n_blocks = experts * shape[1] * shape[2] // info.block_size
        data = torch.from_numpy(random_valid_blocks(rng, qtype, n_blocks, 0.02).reshape(-1))
        out[name] = QuantizedTensor(f"bench.{name}", qtype, shape, data, "random blocks")
    return out


def iq_type_rows(args) -> dict:
    """{type: {"decode_ms", "prefill_ms", "expert_bytes", "rel_err"}} for Q4_K and each of ``args.iq_types``."""
    from kt_cpu_amx.ops import KExpertsCPU

    from ktcore.builtin.experts import KExpertsTorch

    inter = (args.inter + 255) // 256 * 256
    rows = {}
    for qtype in ["Q4_K", *args.iq_types]:
        weights = random_layer(qtype, inter, seed=len(rows))
        op = KExpertsCPU(ExpertsShape(inter), isa=args.isa, threads=args.threads)
        op.load(weights)
        ref_op = KExpertsTorch(ExpertsShape(inter), dtype=torch.float32)
        ref_op.load(weights)
        check = routing(8, torch.Generator().manual_seed(7))
        err = rel_err(op(*check), ref_op(*check))
        del ref_op
        rows[qtype] = {"expert_bytes": op.layer.expert_nbytes, "rel_err": err,
                       "decode_ms": 1e3 * time_op(op, 1, args.decode_reps),
                       "prefill_ms": 1e3 * time_op(op, args.iq_prefill, args.prefill_reps)}
        del op, weights
        r = rows[qtype]
        print(f"{qtype:8s} decode {r['decode_ms']:8.2f} ms  prefill({args.iq_prefill}) {r['prefill_ms']:9.1f} ms  "
              f"expert {r['expert_bytes'] / 2**20:6.2f} MiB  err {err:.3g}", flush=True)
    base = rows["Q4_K"]
    print(f"\n{E} experts, {K_ACTIVE} active, hidden {H}, moe_intermediate {inter}, {args.threads} threads\n")
    print(f"| type | expert MiB | decode ms | vs Q4_K | prefill {args.iq_prefill} ms | vs Q4_K | error vs torch |")
    print("|---|---|---|---|---|---|---|")
    for qtype, r in rows.items():
        print(f"| {qtype} | {r['expert_bytes'] / 2**20:.2f} | {r['decode_ms']:.2f} | {r['decode_ms'] / base['decode_ms']:.2f}x "
              f"| {r['prefill_ms']:.1f} | {r['prefill_ms'] / base['prefill_ms']:.2f}x | {r['rel_err']:.3g} |")
    return rows


def gpt_oss_rows(args) -> dict:
    """GPT-OSS's experts at its widths (hidden = intermediate = 2880, ``--gpt-oss-experts`` experts, top-4, random
    MXFP4 blocks): KExpertsGptOssCPU (the blocks kept) against KExpertsGptOssTorch (float32 weights), decode and
    ``--iq-prefill`` tokens, medians."""
    from types import SimpleNamespace

    from kt_cpu_amx.gpt_oss import KExpertsGptOssCPU

    from ktcore.builtin.experts_gpt_oss import KExpertsGptOssTorch
    from ktcore.weights.tensor import QuantizedTensor

    n_exp, width, top = args.gpt_oss_experts, 2880, 4
    module = SimpleNamespace(gate_up_proj_bias=True, down_proj_bias=True, alpha=1.702, limit=7.0, num_experts=n_exp,
                             hidden_size=width, intermediate_size=width)
    blocks = random_layer("MXFP4", width, seed=0, experts=n_exp, hidden=width)
    g = torch.Generator().manual_seed(0)

    def f32(t):
        return QuantizedTensor("bias", "F32", tuple(t.shape), t.contiguous().view(torch.uint8).reshape(-1), "random")

    weights = {"gate_proj": blocks["gate_proj"], "up_proj": blocks["up_proj"], "down_proj_stored": blocks["down_proj"],
               "down_proj": f32(blocks["down_proj"].dequantize(torch.float32).transpose(1, 2)),
               **{n: f32(0.01 * torch.randn(n_exp, width, generator=g)) for n in ("gate_proj_bias", "up_proj_bias", "down_proj_bias")}}
    ours = KExpertsGptOssCPU(module, isa=args.isa, threads=args.threads)
    ours.load(weights)
    theirs = KExpertsGptOssTorch(module, dtype=torch.float32)
    theirs.load(weights)

    def timed(op, tokens, reps):
        gen = torch.Generator().manual_seed(tokens)
        times = []
        for i in range(reps + 2):
            x = torch.randn(tokens, width, generator=gen)
            idx = torch.stack([torch.randperm(n_exp, generator=gen)[:top] for _ in range(tokens)])
            w = torch.softmax(torch.randn(tokens, top, generator=gen), -1)
            t0 = time.perf_counter()
            op(x, idx, w)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    rows = {"kept_bytes": ours.nbytes, "torch_bytes": 4 * (theirs.gate_up.numel() + theirs.down.numel())}
    for tokens, reps in ((1, args.decode_reps), (args.iq_prefill, args.prefill_reps)):
        rows[tokens] = {"ours_ms": timed(ours, tokens, reps), "torch_ms": timed(theirs, tokens, reps)}
        r = rows[tokens]
        print(f"GPT-OSS experts, {tokens} tokens: KExpertsGptOssCPU {r['ours_ms']:.2f} ms, KExpertsGptOssTorch "
              f"{r['torch_ms']:.2f} ms ({r['ours_ms'] / r['torch_ms']:.2f}x)", flush=True)
    print(f"kept {rows['kept_bytes'] / 2**20:.0f} MiB (MXFP4 blocks) vs {rows['torch_bytes'] / 2**20:.0f} MiB float32")
    return rows


def print_table(result: dict, tokens: list[int]) -> None:
    peers = result.get("kt_kernel", {})
    head = ["tokens", "ktcore ms"]
    for m, row in peers.items():
        if "skipped" not in row:
            head += [f"kt-kernel {m} ms", "ratio"]
    head += ["best peer ratio"] if peers else []
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for T in tokens:
        ours = result["kt_ms"][T]
        cells, best = [str(T), f"{ours:.2f}"], None
        for m, row in peers.items():
            if "skipped" in row:
                continue
            ms = row["ms"][T]
            best = ms if best is None else min(best, ms)
            cells += [f"{ms:.2f} ({row['threads'][T]} thr)", f"{ms / ours:.2f}x"]
        if peers:
            cells.append(f"{best / ours:.2f}x" if best is not None else "-")
        print("| " + " | ".join(cells) + " |")
    for m, row in peers.items():
        print(f"kt-kernel {m}: " + (f"skipped: {row['skipped']}" if "skipped" in row
                                    else f"output error vs torch reference {row['rel_err']:.3g}"))
    print(f"ktcore output error vs torch reference {result['kt_rel_err']:.3g}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--qtype", default="Q4_K", help="experts' GGML type (Q4_K's down_proj falls back to Q8_0 at --inter 1408)")
    ap.add_argument("--inter", type=int, default=1408, help="moe_intermediate (1536: all Q4_K, kt-kernel's GGUF method takes it)")
    ap.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")], default=[1, 32, 128, 512])
    ap.add_argument("--decode-reps", type=int, default=20)
    ap.add_argument("--prefill-reps", type=int, default=5)
    ap.add_argument("--isa", default=None, help="force avx2/avx512/amx (default: best)")
    ap.add_argument("--kt-kernel", default=None, help="kt-kernel's package directory (default: the installed one)")
    ap.add_argument("--no-kt-kernel", action="store_true")
    ap.add_argument("--kt-kernel-threads", default=None, help="thread counts to try, best kept (default: --threads)")
    ap.add_argument("--kt-kernel-methods", default=",".join(KT_KERNEL_METHODS))
    ap.add_argument("--torch", action="store_true", help="also time KExpertsTorch")
    ap.add_argument("--llama-cpp", action="store_true", help="also time llama.cpp (llama-cpp-python) on the whole GGUF")
    ap.add_argument("--iq-types", nargs="?", const=",".join(IQ_TYPES), default=None,
                    help="time the block-decoded types (comma list, default all i-quants, MXFP4, IQ4_NL, TQ2_0; "
                         f"'<type>{ONLINE_SUFFIX}': dequantized, then online int8) against Q4_K on one layer, then exit")
    ap.add_argument("--iq-prefill", type=int, default=128, help="prefill tokens of the --iq-types and --gpt-oss rows")
    ap.add_argument("--gpt-oss", action="store_true", help="time GPT-OSS's experts (MXFP4 blocks) against the torch op, then exit")
    ap.add_argument("--gpt-oss-experts", type=int, default=16, help="experts of the --gpt-oss layer (top-4 of them)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.kt_kernel_threads = args.kt_kernel_threads or str(args.threads)
    if args.gpt_oss:
        torch.set_num_threads(args.threads)
        rows = gpt_oss_rows(args)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return
    if args.iq_types is not None:
        torch.set_num_threads(args.threads)
        args.iq_types = [t for t in args.iq_types.split(",") if t]
        rows = iq_type_rows(args)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return

    from kt_cpu_amx import get_runtime
    from kt_cpu_amx.ops import KExpertsCPU

    from ktcore.builtin.experts import KExpertsTorch
    from ktcore.weights import open_source
    from ktcore.weights.gguf_writer import write_synthetic_moe_gguf

    torch.set_num_threads(args.threads)
    os.environ["KT_CPU_THREADS"] = str(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kt-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {n: str(workdir / f"moe{n}-{args.qtype}-{args.inter}.gguf") for n in (1, 2)}
    for layers, path in paths.items():
        if not os.path.exists(path):
            write_synthetic_moe_gguf(path, layers=layers, qtype=args.qtype, moe_intermediate=args.inter)

    source = open_source(paths[2])
    prefix = "model.layers.1.mlp.experts"
    weights = {n: source.get(f"{prefix}.{n}") for n in ("gate_proj", "up_proj", "down_proj")}
    ours = KExpertsCPU(ExpertsShape(args.inter), isa=args.isa, threads=args.threads)
    t0 = time.perf_counter()
    ours.load(weights)
    rt = get_runtime(args.threads, args.isa)
    result = {"threads": args.threads, "isa": rt.isa, "inter": args.inter,
              "types": {n: q.ggml_type for n, q in weights.items()}, "load_s": time.perf_counter() - t0,
              "read_bandwidth_GBps": read_bandwidth(args.threads)}

    # the torch reference on one 32-token input: every implementation's output error
    ref_op = KExpertsTorch(ExpertsShape(args.inter), dtype=torch.float32)
    ref_op.load(weights)
    check_input = routing(32, torch.Generator().manual_seed(12345))
    reference = ref_op(*check_input)
    result["kt_rel_err"] = rel_err(ours(*check_input), reference)

    result["kt_ms"] = {T: 1e3 * time_op(ours, T, args.decode_reps if T == 1 else args.prefill_reps) for T in args.tokens}
    packed = K_ACTIVE * ours.layer.expert_nbytes
    if 1 in result["kt_ms"]:
        result["decode_GBps_packed_bytes"] = packed / (result["kt_ms"][1] * 1e-3) / 1e9
        result["decode_fraction_of_bandwidth_bound"] = packed / result["read_bandwidth_GBps"] / 1e9 / (result["kt_ms"][1] * 1e-3)

    if args.torch:
        result["torch_ms"] = {T: 1e3 * time_op(ref_op, T, 1, warmup=1) for T in args.tokens}
    if not args.no_kt_kernel:
        ext, how = load_kt_kernel(args.kt_kernel, rt.isa)
        if ext is None:
            result["kt_kernel"] = {m: {"skipped": how} for m in args.kt_kernel_methods.split(",")}
        else:
            result["kt_kernel_variant"] = how
            gate, up = ref_op.gate_up_proj.split(args.inter, dim=1)
            dequantized = {"gate_proj": gate, "up_proj": up, "down_proj": ref_op.down_proj}
            result["kt_kernel"] = kt_kernel_rows(ext, args, weights, dequantized, reference, check_input)
    del ref_op

    if args.llama_cpp:
        try:
            lc = llama_cpp_times(paths[1], paths[2], args.threads, max(args.tokens), max(8, args.decode_reps))
        except Exception as exc:  # reported, not hidden: llama.cpp may be absent or refuse the file
            result["llama_cpp_error"] = f"{type(exc).__name__}: {exc}"
        else:
            result.update({f"llama_cpp_{k}": v for k, v in lc.items()})

    for k, v in result.items():
        if k not in ("kt_kernel", "kt_ms", "torch_ms"):
            print(f"{k:40s} {v:.4g}" if isinstance(v, float) else f"{k:40s} {v}")
    if "torch_ms" in result:
        print("KExpertsTorch ms", {T: round(v, 2) for T, v in result["torch_ms"].items()})
    print_table(result, args.tokens)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
