"""Hybrid CPU/GPU MoE speed: ktcore with attention, shared experts, norms and lm_head on the GPU and the routed
experts on the CPU (KMoE overlapping the two), against the peers a GPU owner would pick, on the same GGUF, with the
same thread count, in the same run:

- the main peer: llama.cpp built with CUDA (``--llama-bench PATH``: its ``llama-bench``, built as
  ../shared/peers/README.md says; ``--peer-runner run-peer.sh`` finds the host's cuBLAS) running everything on
  the GPU but the routed experts (``-ngl 999 -ot exps=CPU -fa 1``);
- the VRAM curve (``--gpu-expert-layers 0,13,26``): at each point N, llama.cpp keeps the last N MoE layers' experts
  on the GPU (``-ot`` sending the others' ``ffn_*_exps`` to the CPU) and ktcore runs the rule file that
  ``kt rules suggest`` writes (ktcore.placement.suggest_placement, the CLI's code path) for a VRAM budget of its
  dense part + KV cache + streaming buffers + N layers' experts, which places the same N layers' experts on the
  GPU; with --gpu-prefill-threshold (default ktcore.placement.GPU_PREFILL_THRESHOLD, 0: off) longer prompts stream
  the CPU-resident experts to the GPU;
- llama.cpp on the CPU alone (llama-cpp-python, n_gpu_layers=0) as a second row, first prompt size only.

The first ktcore row is the shipped gpu-cpu rule file (KMoE on every sparse block, all routed experts on the CPU),
loaded as ``kt run`` loads it (``ktcore.cli.model_options.open_model`` and its warm-up).
``--find-threshold`` loads the N=0 plan and times prefill of 8..512-token prompts with the streamed GPU prefill on
and off (the rule kwarg gpu_prefill_threshold set to 1 or beyond the prompt): the smallest size from which
streaming wins is the threshold to write into the rules (``kt rules suggest --prefill-threshold``).

Model: the DeepSeek-V2-Lite-shaped synthetic GGUF of ``ktcore.weights.gguf_writer.write_synthetic_moe_gguf``
(27 layers by default: layer 0 dense, 26 MoE layers of 64 routed experts (6 active) + 2 shared, hidden 2048,
moe_intermediate 1408, MLA attention with kv_lora_rank 512; Q4_K experts, Q8_0 dense weights, vocab 4096),
written once into ~/.cache/ktcore (KTCORE_CACHE overrides), shared with bench_decode.py. llama.cpp takes a
deepseek2 file without q_lora_rank only at V2-Lite's depth (it recognizes V2-Lite by 26/27 layers), so other
--layers time ktcore alone; --tiny keeps 27 layers at small widths (8 experts, 2 active, hidden 256) so the
whole comparison runs in seconds on a CPU-only machine.

Figures: prefill tok/s (each --prompt-tokens prompt into an empty cache) and decode tok/s (--gen-tokens greedy
steps), medians over --repeats, ktcore's from its Generator's own timing; ratios to llama.cpp CUDA at the same
point of the curve; the GPU memory ktcore used (torch.cuda.max_memory_allocated, load and runs).
--compare-overlap also times ktcore with KMoE's overlap switched off. Decode replays CUDA graphs by default on
cuda (--no-cuda-graph: eager steps); --compare-graph times three decode modes: eager with the routed experts'
synchronous submit/sync, eager with their stream-ordered path, and CUDA graphs; --breakdown times the step with
the routed experts zeroed and the CPU experts alone.

    python bench/bench_hybrid.py --threads 16 --llama-bench /tmp/lcpp/llama-bench \\
        --peer-runner ../shared/peers/run-peer.sh --prompt-tokens 512,2048 --gpu-expert-layers 0,13,26
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

import ktcore  # noqa: F401,E402  (before torch: the OpenMP wait policy ktcore sets, see ktcore/__init__.py)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import synthetic_moe_gguf  # noqa: E402  (one cached file for both benchmarks)
from models import CACHE_DIR, llama_bench  # noqa: E402

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


# -- llama.cpp with CUDA (llama-bench) -------------------------------------------------------------------


def moe_layers_of(path: Path) -> list[int]:
    """Block indices of the GGUF's layers with routed experts (``blk.N.ffn_down_exps``)."""
    from gguf import GGUFReader

    names = (t.name for t in GGUFReader(str(path)).tensors)
    return sorted({int(n.split(".")[1]) for n in names if n.endswith("ffn_down_exps.weight")})


def cpu_experts_override(cpu_layers: list[int] | None) -> str | None:
    """llama.cpp's ``-ot`` value that keeps ``cpu_layers``' routed experts on the CPU (``None``: all of them)."""
    if cpu_layers is None:
        return "exps=CPU"
    if not cpu_layers:
        return None
    return rf"blk\.({'|'.join(str(i) for i in cpu_layers)})\.ffn_.*_exps=CPU"


def run_llama_bench(path: Path, prompts: list[int], args, cpu_layers: list[int] | None) -> tuple[dict, float]:
    """``({prompt tokens: prefill tok/s}, decode tok/s)`` of llama.cpp's CUDA build, all layers offloaded
    (``-ngl 999 -fa 1``) but the routed experts of ``cpu_layers`` (``None``: every layer's)."""
    override = cpu_experts_override(cpu_layers)
    extra = ["-ngl", "999", "-fa", "1", *(["-ot", override] if override else [])]
    try:
        return llama_bench(args.llama_bench, path, args.threads, prompts, args.gen_tokens, args.repeats, extra,
                           args.peer_runner)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from exc


# -- ktcore with the planner's rule files ----------------------------------------------------------------


def planned_rules(path: Path, gpu_layers: int, moe_layers: list[int], args) -> Path:
    """The rule file ``kt rules suggest`` writes for a VRAM budget that holds ktcore's dense part, KV cache and
    streaming buffers plus the routed experts of ``gpu_layers`` MoE layers (the planner takes the last ones)."""
    from ktcore.placement import RESERVE, base_rule_file, free_memory, placement_rules, rules_usage, suggest_placement
    from ktcore.weights import open_source

    context = max(args.prompts) + args.gen_tokens + 16
    threshold = args.gpu_prefill_threshold or None
    source = open_source(str(path))
    base = base_rule_file("deepseek_v2").read_text()  # the file suggest_placement plans from
    wanted = moe_layers[len(moe_layers) - gpu_layers:] if gpu_layers else []
    streams = threshold if len(wanted) < len(moe_layers) else None
    usage = rules_usage(source, placement_rules(base, gpu_layers=wanted, prefill_threshold=streams), context=context)
    vram = usage.total("cuda:0") + RESERVE["cuda"] + 4096  # the planner estimates with the same function
    ram = free_memory("cpu") or 2**40
    plan = suggest_placement(path, vram, ram, context=context, prefill_threshold=threshold)
    if plan.gpu_layers != wanted:
        print(f"note: the planner put layers {plan.gpu_layers} on the GPU for {vram / 2**30:.2f} GiB (asked {wanted})")
    out = CACHE_DIR / f"bench-hybrid-plan-{gpu_layers}.yaml"
    out.write_text(plan.rules_text)
    return out


def bench_prompts(gen, ids, args) -> tuple[dict, float]:
    """``({prompt tokens: prefill tok/s}, decode tok/s)``: decode after the first prompt size."""
    prefill, decode = {}, None
    for n in args.prompts:
        p, d = bench_ktcore(gen, ids[:n], args.gen_tokens if decode is None else 1, args.repeats)
        prefill[n] = p
        decode = d if decode is None else decode
    return prefill, decode


def find_threshold(gen, ids, args) -> None:
    """Prefill tok/s with the streamed GPU prefill on and off for growing prompts; the threshold to use."""
    from ktcore.moe import KMoE

    blocks = [m for m in gen.model.modules() if isinstance(m, KMoE) and m.gpu_prefill_threshold]
    if not blocks:
        print("--find-threshold: no KMoE block streams its experts (the plan gave it no room); nothing to measure")
        return
    rows, wins = [], []
    for n in (8, 16, 32, 64, 128, 256, 512):
        if n > len(ids):
            break
        times = {}
        for on in (False, True):
            for block in blocks:
                block.gpu_prefill_threshold = 1 if on else 10**9
            times[on] = bench_ktcore(gen, ids[:n], 1, args.repeats)[0]
        rows.append(f"{n:>8} {times[False]:>16.1f} {times[True]:>16.1f} {times[True] / times[False]:>8.2f}")
        wins.append((n, times[True] > times[False]))
    for block in blocks:
        block.gpu_prefill_threshold = args.gpu_prefill_threshold
    print(f"{'tokens':>8} {'CPU experts':>16} {'streamed to GPU':>16} {'ratio':>8}   (prefill tok/s)")
    print("\n".join(rows))
    threshold = next((n for i, (n, _) in enumerate(wins) if all(w for _, w in wins[i:])), None)
    if threshold is None:
        print("streaming never wins up to the longest prompt measured")
    else:
        before = max((m for m, _ in wins if m < threshold), default=threshold - 1)
        print(f"streaming wins from {threshold} tokens on: gpu_prefill_threshold {before} "
              f"(kt rules suggest --prefill-threshold {before})")


def load_ktcore(path: Path, rules: list[Path] | None, args):
    """``(Generator, report, load seconds)``: loaded as ``kt run --threads N [--rules FILE | --layout L]`` loads
    it (``ktcore.cli.model_options.open_model``, the shipped rule file for --device's layout unless ``rules``),
    warmed up as loading does (``gen.warm_up_s``, not in the load time)."""
    from ktcore.cli.model_options import model_args, open_model
    from ktcore.cli.run import warmed_generator

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    options = model_args(path, rules=[str(r) for r in rules] if rules else None,
                         layout=None if rules else ("gpu-cpu" if args.device == "cuda" else "cpu"),
                         threads=args.threads, max_context=max(args.prompts) + args.gen_tokens + 16,
                         cuda_graph=not args.no_cuda_graph, quiet=True)
    t0 = time.perf_counter()
    loaded = open_model(options)
    load_s = time.perf_counter() - t0
    return warmed_generator(loaded, options), loaded.report, load_s


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
    from ktcore.placement import GPU_PREFILL_THRESHOLD

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=27, help="layers of the synthetic model (first dense; default 27)")
    ap.add_argument("--tiny", action="store_true", help="27 layers at small widths (smoke check; ignores --layers)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda: the gpu-cpu rules (default where CUDA is present); cpu: the cpu rules (smoke check)")
    ap.add_argument("--rules", default=None, help="ktcore rule file (default: the shipped deepseek_v2 one for --device)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="CPU threads for both engines (default: all this process may use)")
    ap.add_argument("--prompt-tokens", default="512", help="prompt sizes, comma-separated (default 512)")
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--llama-bench", default=None,
                    help="llama-bench of a CUDA build of llama.cpp (../shared/peers/README.md): the main peer")
    ap.add_argument("--peer-runner", default=None, help="script that runs it: run-peer.sh DIR llama-bench ARGS")
    ap.add_argument("--gpu-expert-layers", default="0",
                    help="VRAM curve: numbers of MoE layers whose routed experts live on the GPU (default 0)")
    ap.add_argument("--gpu-prefill-threshold", type=int, default=GPU_PREFILL_THRESHOLD,
                    help="planned rules: stream CPU experts to the GPU above this many tokens (0: never)")
    ap.add_argument("--find-threshold", action="store_true",
                    help="time prefill with the streamed GPU prefill on and off for 8..512 tokens")
    ap.add_argument("--no-llamacpp-cpu", action="store_true", help="skip the llama.cpp CPU-only row")
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
    args.prompts = [int(n) for n in str(args.prompt_tokens).split(",")]
    curve = [int(n) for n in args.gpu_expert_layers.split(",")]
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available (use --device cpu for a smoke check)")
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    path = tiny_gguf() if args.tiny else synthetic_moe_gguf(args.layers)
    if args.tiny:
        args.layers = 27
    print(f"model: {path} ({gib(path.stat().st_size)}, ready in {time.perf_counter() - t0:.1f} s)")
    rules = [Path(args.rules)] if args.rules else None  # None: the shipped file, as kt run picks it
    from gguf import GGUFReader

    vocab = int(GGUFReader(str(path)).fields["deepseek2.vocab_size"].contents())
    ids = prompt_ids(vocab, max(args.prompts))
    moe_layers = moe_layers_of(path)
    first = args.prompts[0]

    rows = []  # (engine, expert layers on GPU, {prompt: prefill tok/s}, decode tok/s, VRAM peak)
    peers = {}  # expert layers on GPU -> llama.cpp CUDA's ({prompt: prefill}, decode)
    llama_ok = not args.no_llamacpp and args.layers in LLAMACPP_LITE_LAYERS
    if not args.no_llamacpp and not llama_ok:
        print(f"llama.cpp skipped: it loads this q_lora_rank-free deepseek2 file only with {LLAMACPP_LITE_LAYERS} "
              "layers (use --tiny for a small comparison)")
    if llama_ok and args.llama_bench and args.device == "cuda":
        for n in curve:
            cpu_layers = None if n == 0 else moe_layers[: len(moe_layers) - n]
            peers[n] = run_llama_bench(path, args.prompts, args, cpu_layers)
            rows.append((f"llama.cpp CUDA, {'-ot exps=CPU' if n == 0 else f'{n} layers exps on GPU'}", n, *peers[n], None))
    if llama_ok and not args.no_llamacpp_cpu:
        prefill, decode = run_llamacpp(path, ids[:first], args)
        rows.append(("llama.cpp (CPU only)", None, {first: prefill}, decode, None))

    def ktcore_row(name, gen, n):
        prefill, decode = bench_prompts(gen, ids, args)
        peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
        rows.append((name, n, prefill, decode, peak))

    gen, report, load_s = load_ktcore(path, rules, args)
    print(f"ktcore: rules {', '.join(report.rule_files)}; loaded in {load_s:.1f} s, warm-up {gen.warm_up_s:.1f} s; "
          f"{layout_summary(gen.model)}")
    label = "ktcore shipped rules (GPU+CPU)" if args.device == "cuda" else "ktcore (CPU)"
    if args.compare_graph and args.device == "cuda":
        for name, (prefill, decode) in bench_decode_modes(gen, ids[:first], args, label).items():
            rows.append((name, 0, {first: prefill}, decode, None))
    else:
        ktcore_row(label, gen, 0)
        if args.device == "cuda" and not args.no_cuda_graph:
            print(f"CUDA graphs: {'on' if gen.graph_problem is None else 'off: ' + str(gen.graph_problem)}")
    if args.breakdown:
        breakdown(gen, ids[:first], args)
    if args.profile and args.device == "cuda":
        profile_gpu_side(gen, ids[:first], args)
    if args.compare_overlap:
        from ktcore.moe import KMoE

        blocks = [m for m in gen.model.modules() if isinstance(m, KMoE)]
        if not blocks:
            print("--compare-overlap: the model has no KMoE block (the rules use none)")
        for block in blocks:
            block.overlap = False
        if blocks:
            prefill, decode = bench_ktcore(gen, ids[:first], args.gen_tokens, args.repeats)
            rows.append((label + " no overlap", 0, {first: prefill}, decode, None))
        for block in blocks:
            block.overlap = True
    del gen
    gc.collect()

    if args.device == "cuda" and args.rules is None:
        for n in curve:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            plan = planned_rules(path, n, moe_layers, args)
            gen, _, load_s = load_ktcore(path, [plan], args)
            print(f"ktcore: {plan} ({n} MoE layers' experts on the GPU); loaded in {load_s:.1f} s; "
                  f"{layout_summary(gen.model)}")
            ktcore_row(f"ktcore planned, {n} layers exps on GPU", gen, n)
            if args.find_threshold and n == curve[0]:
                find_threshold(gen, ids, args)
            del gen
            gc.collect()

    print(f"threads={args.threads}  layers={args.layers}  decode={args.gen_tokens} tok  repeats={args.repeats} (medians);"
          " ratios to llama.cpp CUDA with the same MoE layers' experts on the GPU")
    head = f"{'engine':<40}" + "".join(f" {f'prefill {n}':>12} {'x':>5}" for n in args.prompts) + \
        f" {'decode tok/s':>12} {'x':>5} {'VRAM peak':>10}"
    print(head + "\n" + "-" * len(head))
    for name, n, prefill, decode, peak in rows:
        peer = peers.get(n if n is not None else 0)
        cells = ""
        for p in args.prompts:
            value = prefill.get(p)
            ratio = f"{value / peer[0][p]:.2f}" if value and peer and peer[0].get(p) else "-"
            cells += f" {value:>12.1f} {ratio:>5}" if value else f" {'-':>12} {'-':>5}"
        ratio = f"{decode / peer[1]:.2f}" if peer else "-"
        print(f"{name:<40}{cells} {decode:>12.2f} {ratio:>5} {gib(peak) if peak else '-':>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
