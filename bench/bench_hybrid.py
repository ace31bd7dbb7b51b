"""Hybrid CPU/GPU MoE speed: ktcore with attention, shared experts, norms and lm_head on the GPU and the routed
experts on the CPU (KMoE overlapping the two), against llama.cpp on the CPU alone (n_gpu_layers=0), on the
same GGUF, with the same thread count, in the same run.

Model: the DeepSeek-V2-Lite-shaped synthetic GGUF of ``ktcore.weights.gguf_writer.write_synthetic_moe_gguf``
(27 layers by default: layer 0 dense, 26 MoE layers of 64 routed experts (6 active) + 2 shared, hidden 2048,
moe_intermediate 1408, MLA attention with kv_lora_rank 512; Q4_K experts, Q8_0 dense weights, vocab 4096),
written once into ~/.cache/ktcore (KTCORE_CACHE overrides), shared with bench_decode.py. llama.cpp takes a
deepseek2 file without q_lora_rank only at V2-Lite's depth (it recognizes V2-Lite by 26/27 layers), so other
--layers time ktcore alone; --tiny keeps 27 layers at small widths (8 experts, 2 active, hidden 256) so the
whole comparison runs in seconds on a CPU-only machine.

Figures: prefill tok/s (a --prompt-tokens prompt into an empty cache) and decode tok/s (--gen-tokens greedy
steps), medians over --repeats, ktcore's from its Generator's own timing; ratios to llama.cpp; the GPU memory
ktcore used (torch.cuda.max_memory_allocated after loading and after the runs). --compare-overlap also
times ktcore with KMoE's overlap switched off (routed experts finish before the shared experts start).
Decode replays CUDA graphs by default on cuda (--no-cuda-graph: eager steps); --compare-graph times three
decode modes: eager with the routed experts' synchronous submit/sync, eager with their stream-ordered path
(host functions on the CUDA stream, no host wait), and CUDA graphs (the stream-ordered path captured);
--breakdown times the step with the routed experts zeroed and the CPU experts alone.

    python bench/bench_hybrid.py --threads 16                          # GPU machine: full 27 layers
    python bench/bench_hybrid.py --device cpu --tiny --threads 2       # smoke check without a GPU
    python bench/bench_hybrid.py --device cpu --layers 2 --threads 2   # ktcore alone, full widths, 2 layers
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import synthetic_moe_gguf  # noqa: E402  (one cached file for both benchmarks)
from models import CACHE_DIR  # noqa: E402

from ktcore.cli.bench import bench_ktcore, bench_llamacpp  # noqa: E402


def pick_rules(layout: str) -> Path:
    """The shipped ``deepseek_v2-<layout>.yaml``, as load_model selects it."""
    from ktcore.rule_selection import select_rule_file

    return select_rule_file("deepseek_v2", layout=layout)


LLAMACPP_LITE_LAYERS = (26, 27)
TINY = dict(experts=8, experts_used=2, hidden=256, moe_intermediate=256, intermediate=512, heads=2,
            kv_lora_rank=128, vocab=1024)


def tiny_gguf() -> Path:
    from ktcore.weights.gguf_writer import write_synthetic_moe_gguf

    path = CACHE_DIR / "synthetic-dsv2lite-shape-27l-tiny-q4_k.gguf"
    if not path.is_file():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        write_synthetic_moe_gguf(partial, layers=27, qtype="Q4_K", **TINY)
        partial.replace(path)
    return path


KMOE_RULE = r"""# bench_hybrid: KMoE on every sparse MoE block, ahead of the CPU layout's own rules
- match:
    name: '^model\.layers\.\d+\.mlp$'
    class: moe
  replace:
    class: KMoE
"""


def with_kmoe(rules: Path) -> list[Path]:
    """``rules`` preceded by a KMoE rule when it has none (the CPU layouts), so the smoke check runs KMoE."""
    if "KMoE" in rules.read_text():
        return [rules]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    snippet = CACHE_DIR / "bench-hybrid-kmoe.yaml"
    snippet.write_text(KMOE_RULE)
    return [snippet, rules]


def prompt_ids(vocab: int, n: int) -> list[int]:
    rng = random.Random(0)  # the model is random: any fixed ids do
    return [rng.randrange(3, vocab) for _ in range(n)]


def run_llamacpp(path: Path, ids: list[int], args) -> tuple[float, float]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_threads=args.threads, n_threads_batch=args.threads, n_gpu_layers=0,
                n_ctx=len(ids) + args.gen_tokens + 16, n_batch=512, verbose=False)
    try:
        return bench_llamacpp(llm, ids, args.gen_tokens, args.repeats)
    finally:
        del llm
        gc.collect()


def load_ktcore(path: Path, rules: list[Path], args):
    from ktcore.generate import Generator
    from ktcore.inject import load_model
    from ktcore.weights import open_source

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    source = open_source(str(path))
    model, report = load_model(source, rules=rules, progress=False)
    load_s = time.perf_counter() - t0
    gen = Generator(model, source.tokenizer(), max_context=args.prompt_tokens + args.gen_tokens + 16,
                    cuda_graph=False if args.no_cuda_graph else None)
    return gen, report, load_s


def set_stream_experts(model, on: bool) -> None:
    from ktcore.modules import KExperts

    for module in model.modules():
        if isinstance(module, KExperts):
            module.stream_ordered = on


def bench_decode_modes(gen, ids, args, label: str) -> dict:
    """eager + synchronous experts, eager + stream-ordered experts, CUDA graphs (in that order: the graphs
    are built last, with the stream-ordered path on)."""
    results = {}
    gen.cuda_graph = False
    set_stream_experts(gen.model, False)
    results[label + " eager sync"] = bench_ktcore(gen, ids, args.gen_tokens, args.repeats)
    set_stream_experts(gen.model, True)
    results[label + " eager stream"] = bench_ktcore(gen, ids, args.gen_tokens, args.repeats)
    gen.cuda_graph = None
    results[label + " graph"] = bench_ktcore(gen, ids, args.gen_tokens, args.repeats)
    print(f"CUDA graphs: {'on' if gen.graph_problem is None else 'off: ' + gen.graph_problem}")
    return results


def layout_summary(model) -> str:
    from ktcore.modules import KExperts
    from ktcore.moe import KMoE

    blocks = [m for m in model.modules() if isinstance(m, KMoE)]
    experts = [m for m in model.modules() if isinstance(m, KExperts)]
    ops = sorted({f"{op.name}@{op.device}" for e in experts for op in e.ops()})
    return f"{len(blocks)} KMoE blocks, {len(experts)} KExperts ({', '.join(ops) or '-'})"


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def cpu_experts_ms(model, tokens: int = 5) -> float:
    """Median milliseconds per decode token of the routed experts alone: every layer's generate op on one
    token routed to random experts (other experts per layer and per token, as in decode), called directly."""
    from ktcore.modules import KExperts

    ops = [m.generate_op for m in model.modules() if isinstance(m, KExperts)]
    if not ops:
        return 0.0
    g = torch.Generator().manual_seed(0)
    k = int(getattr(model.config, "num_experts_per_tok", 6))
    times = []
    for _ in range(tokens + 1):  # the first one warms up
        t0 = time.perf_counter()
        for op in ops:
            x = torch.randn(1, op.hidden_dim, generator=g)
            idx = torch.randperm(op.num_experts, generator=g)[:k][None]
            op(x, idx, torch.full((1, k), 1.0 / k))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def zero_routed_experts(model, on: bool) -> None:
    """Swap every KExperts' submit/sync for zeros on the GPU (``on``) or back: what decode costs without the
    CPU experts (a benchmark-only patch of the instances)."""
    import types

    from ktcore.modules import KExperts

    for m in model.modules():
        if not isinstance(m, KExperts):
            continue
        if on:
            m.submit = types.MethodType(lambda self, h, i, w: self.__dict__.__setitem__("_zeros", torch.zeros_like(h)), m)
            m.sync = types.MethodType(lambda self: self.__dict__.pop("_zeros"), m)
        else:
            m.__dict__.pop("submit", None)
            m.__dict__.pop("sync", None)


def breakdown(gen, ids, args) -> None:
    """Where a graph decode step's time goes: the whole step, the step with the routed experts zeroed (GPU
    side + replay overhead), and the CPU experts alone (called from Python, no GPU)."""
    from ktcore.generate import Generator

    whole = bench_ktcore(gen, ids, args.gen_tokens, args.repeats)[1]
    zero_routed_experts(gen.model, True)
    try:
        no_cpu = Generator(gen.model, gen.tokenizer, max_context=gen.max_context)  # its own cache and graphs
        gpu_side = bench_ktcore(no_cpu, ids, args.gen_tokens, args.repeats)[1]
        del no_cpu
    finally:
        zero_routed_experts(gen.model, False)
    cpu_ms = cpu_experts_ms(gen.model)
    print(f"breakdown (ms per decode token): whole step {1e3 / whole:.2f} | routed experts zeroed "
          f"{1e3 / gpu_side:.2f} | CPU experts alone {cpu_ms:.2f} | not overlapped "
          f"{1e3 / whole - max(1e3 / gpu_side, cpu_ms):.2f}")


def profile_gpu_side(gen, ids, args, top: int = 15) -> None:
    """The GPU kernels of eager decode steps with the routed experts zeroed, ranked by total CUDA time
    (torch.profiler): where the GPU side of a step goes."""
    from torch.profiler import ProfilerActivity, profile

    from ktcore.generate import Generator, SamplingParams

    zero_routed_experts(gen.model, True)
    try:
        eager = Generator(gen.model, gen.tokenizer, max_context=gen.max_context, cuda_graph=False)
        params = SamplingParams(max_new_tokens=args.gen_tokens, temperature=0.0)
        for _ in eager.generate_ids(ids[:16], SamplingParams(max_new_tokens=2, temperature=0.0)):
            pass
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in eager.generate_ids(ids[:16], params):
                pass
        del eager
    finally:
        zero_routed_experts(gen.model, False)
    steps = args.gen_tokens
    rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:top]
    total = sum(e.device_time_total for e in prof.key_averages())
    print(f"GPU kernels of {steps} eager decode steps (experts zeroed; prefill of 16 tokens included), "
          f"{total / steps / 1e3:.2f} ms of kernel time per step:")
    for e in rows:
        print(f"  {e.device_time_total / steps:9.1f} us/step  {e.count / steps:6.1f} calls/step  {e.key[:90]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=27, help="layers of the synthetic model (first dense; default 27)")
    ap.add_argument("--tiny", action="store_true", help="27 layers at small widths (smoke check; ignores --layers)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda: the gpu-cpu rules (default where CUDA is present); cpu: the cpu rules (smoke check)")
    ap.add_argument("--rules", default=None, help="ktcore rule file (default: the shipped deepseek_v2 one for --device)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="CPU threads for both engines (default: all this process may use)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare-overlap", action="store_true", help="also time ktcore with KMoE overlap off")
    ap.add_argument("--no-llamacpp", action="store_true", help="time ktcore alone")
    ap.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly (default: CUDA graphs on cuda)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the decode step with the routed experts zeroed, and the CPU experts alone")
    ap.add_argument("--profile", action="store_true",
                    help="list the GPU kernels of eager decode steps (routed experts zeroed) by CUDA time")
    ap.add_argument("--compare-graph", action="store_true",
                    help="time decode eager (synchronous experts), eager (stream-ordered experts) and with graphs")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available (use --device cpu for a smoke check)")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("KT_CPU_THREADS", str(args.threads))  # kt-cpu-amx's expert pool: the same threads

    t0 = time.perf_counter()
    path = tiny_gguf() if args.tiny else synthetic_moe_gguf(args.layers)
    if args.tiny:
        args.layers = 27
    print(f"model: {path} ({gib(path.stat().st_size)}, ready in {time.perf_counter() - t0:.1f} s)")
    rules = [Path(args.rules)] if args.rules else with_kmoe(pick_rules("gpu-cpu" if args.device == "cuda" else "cpu"))
    from gguf import GGUFReader

    vocab = int(GGUFReader(str(path)).fields["deepseek2.vocab_size"].contents())
    ids = prompt_ids(vocab, args.prompt_tokens)

    results = {}
    if args.no_llamacpp:
        pass
    elif args.layers not in LLAMACPP_LITE_LAYERS:
        print(f"llama.cpp skipped: it loads this q_lora_rank-free deepseek2 file only with {LLAMACPP_LITE_LAYERS} "
              "layers (use --tiny for a small comparison)")
    else:
        results["llama.cpp (CPU)"] = run_llamacpp(path, ids, args)
    gen, report, load_s = load_ktcore(path, rules, args)
    vram_load = torch.cuda.max_memory_allocated() if args.device == "cuda" else 0
    print(f"ktcore: rules {', '.join(map(str, rules))}; loaded in {load_s:.1f} s; {layout_summary(gen.model)}")
    label = "ktcore (GPU+CPU)" if args.device == "cuda" else "ktcore (CPU)"
    if args.compare_graph and args.device == "cuda":
        results.update(bench_decode_modes(gen, ids, args, label))
    else:
        results[label] = bench_ktcore(gen, ids, args.gen_tokens, args.repeats)
        if args.device == "cuda" and not args.no_cuda_graph:
            print(f"CUDA graphs: {'on' if gen.graph_problem is None else 'off: ' + str(gen.graph_problem)}")
    if args.breakdown:
        breakdown(gen, ids, args)
    if args.profile and args.device == "cuda":
        profile_gpu_side(gen, ids, args)
    if args.compare_overlap:
        from ktcore.moe import KMoE

        blocks = [m for m in gen.model.modules() if isinstance(m, KMoE)]
        if not blocks:
            print("--compare-overlap: the model has no KMoE block (the rules use none)")
        for block in blocks:
            block.overlap = False
        if blocks:
            results[label + " no overlap"] = bench_ktcore(gen, ids, args.gen_tokens, args.repeats)
        for block in blocks:
            block.overlap = True
    vram_peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else 0

    print(f"threads={args.threads}  layers={args.layers}  prompt={args.prompt_tokens} tok  decode={args.gen_tokens} tok"
          f"  repeats={args.repeats} (medians)")
    ref = results.get("llama.cpp (CPU)")
    head = f"{'engine':<34} {'prefill tok/s':>13} {'x llama.cpp':>11} {'decode tok/s':>12} {'x llama.cpp':>11}"
    print(head + "\n" + "-" * len(head))
    for name, (prefill, decode) in results.items():
        rp = f"{prefill / ref[0]:.2f}" if ref else "-"
        rd = f"{decode / ref[1]:.2f}" if ref else "-"
        print(f"{name:<34} {prefill:>13.1f} {rp:>11} {decode:>12.2f} {rd:>11}")
    if args.device == "cuda":
        print(f"GPU memory (torch.cuda.max_memory_allocated): {gib(vram_load)} after loading, {gib(vram_peak)} peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
