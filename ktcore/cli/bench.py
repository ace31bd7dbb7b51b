"""``kt bench MODEL``: prefill and decode speed of ktcore (and of llama.cpp on the same file, when
llama-cpp-python is installed), beside the memory-bandwidth bound of decoding.

The measuring functions are shared with ``bench/bench_decode.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time

from .model_options import (
    MODEL_OPTIONS_HELP,
    CLIError,
    add_model_options,
    check_model_options,
    open_model,
)
from .llamacpp_peer import LlamaCppProcess, bench_llamacpp, open_llama  # noqa: F401 (bench_llamacpp: the benches' in-process peer)
from .run import run_guarded, warmed_generator

PROMPT_TEXT = ("The history of science is the study of the development of science and scientific knowledge, "
               "including both the natural and social sciences. ")

BENCH_EXAMPLES = """\
examples:
  kt bench model.gguf
  kt bench model.gguf --rules my-rules.yaml --threads 8 --prompt-tokens 512 --gen-tokens 64
  kt bench model.gguf --no-llamacpp
  kt bench model.gguf --threads 2 --repeats 7 --profile
"""


# ---------------------------------------------------------------------------------------------- measuring


def copy_bandwidth(threads: int, mbytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large torch copy (read + write counted), median of ``repeats``."""
    import torch

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


def gguf_active_bytes(path) -> int:
    """Bytes of the GGUF tensors one decoded token reads: everything but the embedding rows (unless the
    embedding is also the output head), routed experts counted for the active ones only."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    used_key = f"{arch}.expert_used_count"
    used = int(reader.fields[used_key].contents()) if used_key in reader.fields else 0
    names = {t.name for t in reader.tensors}
    total = 0
    for t in reader.tensors:
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue
        n = int(t.n_bytes)
        if "_exps." in t.name:
            n = n * used // int(t.shape[-1])  # GGUF lists dimensions innermost first: experts last
        total += n
    return total


def ktcore_active_bytes(model, source=None) -> int:
    """Bytes of ktcore's resident tensors one decoded token reads (each storage once; as above). A wrapper
    whose ops keep their weights outside torch tensors (a C++ kernel's own buffers) is counted at the size
    of its GGUF tensors in ``source``."""
    config = model.config
    experts = (getattr(config, "n_routed_experts", None) or getattr(config, "num_experts", None)
               or getattr(config, "num_local_experts", None))
    used = getattr(config, "num_experts_per_tok", None)
    head = model.get_output_embeddings()
    head_ptrs = {t.data_ptr() for t in [*head.parameters(), *head.buffers()]} if head is not None else set()
    seen, total = set(), 0
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if t is None or t.device.type == "meta" or t.numel() <= 1 or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if ("embed_tokens" in name and t.data_ptr() not in head_ptrs) or "rotary_emb" in name:
            continue  # one row per token
        n = t.numel() * t.element_size()
        if ".experts." in name and experts and used:
            n = n * used // experts  # an experts module holds all experts, whatever layout its op repacked to
        total += n
    if source is not None:
        from ktcore.modules import KModule

        for qualname, module in model.named_modules():
            if not isinstance(module, KModule):
                continue
            if any(True for op in module.ops() for _ in [*op.parameters(), *op.buffers()]):
                continue
            for local in module.weight_names():
                n = source.get(f"{qualname}.{local}").data.numel()
                total += n * used // experts if qualname.endswith(".experts") and experts and used else n
    return total


def bench_ktcore(gen, prompt_ids, gen_tokens: int, repeats: int, warm_up: bool = True) -> tuple[float, float]:
    """Median (prefill tok/s, decode tok/s) from the Generator's own timing, after a short untimed run (as
    ``bench_llamacpp`` does): loading warmed the model up (``ktcore.cli.run.warmed_generator``), and this one
    warms what the caller changed since (CUDA graphs on or off, another generator over the same model)."""
    from ktcore.generate import SamplingParams

    if warm_up:
        list(gen.generate_ids(prompt_ids[:8], SamplingParams(max_new_tokens=3, ignore_eos=True)))
    params = SamplingParams(max_new_tokens=gen_tokens + 1, ignore_eos=True)
    prefill, decode = [], []
    for _ in range(repeats):
        for _ in gen.generate_ids(prompt_ids, params):
            pass
        prefill.append(gen.last_timing.prefill_tok_s)
        decode.append(gen.last_timing.decode_tok_s)
    return statistics.median(prefill), statistics.median(decode)


_PROBE = """
import json, sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_threads=1, n_ctx=64, verbose=False,
                      kv_overrides=json.loads(sys.argv[2]) or None)
llm.eval(llm.tokenize(b"The history of science", add_bos=True))
"""


@functools.cache
def llamacpp_extra_bufts_work(path, kv_overrides: tuple = ()) -> bool:
    """Whether llama.cpp survives evaluating ``path`` with its extra buffer types (weight repacking, AMX), tried
    in a child process: the AMX path of native llama-cpp-python builds (0.3.36) dies with SIGSEGV in
    ``ggml_backend_amx_mul_mat`` on the Xeons of the dev machine and of the GPU host."""
    done = subprocess.run([sys.executable, "-c", _PROBE, str(path), json.dumps(dict(kv_overrides))],
                          capture_output=True, timeout=600)
    return done.returncode == 0


def llamacpp_overrides(path) -> dict | None:
    """GGUF keys llama.cpp needs that ``path`` leaves out: a DeepSeek-V2 file without ``q_lora_rank`` has no q LoRA
    (llama.cpp infers that from V2-Lite's 27 layers and asks shallower files for the key), so 0."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    if "deepseek2.block_count" in fields and "deepseek2.attention.q_lora_rank" not in fields:
        return {"deepseek2.attention.q_lora_rank": 0}
    return None


def load_llamacpp(path, threads: int, n_ctx: int = 2048, logits_all: bool = False, exact_kv: bool = False,
                  kv_overrides: dict | None = None):
    """llama.cpp on ``path`` (ImportError without llama-cpp-python). ``exact_kv``: keep its KV cache in F32
    instead of the default F16, so the reference only carries the approximations of its matmul kernels. Where its
    extra buffer types crash (``llamacpp_extra_bufts_work``) they are turned off."""
    import llama_cpp

    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if exact_kv else {}
    extra = llamacpp_extra_bufts_work(str(path), tuple(sorted((kv_overrides or {}).items())))
    return open_llama(path, threads, n_ctx, extra, kv_overrides, logits_all=logits_all, **kv)


def format_table(rows, bandwidth: float) -> str:
    """``rows``: dicts with model, engine, prefill, decode, bytes, and the llama.cpp row's figures as
    ``ref`` (or None)."""
    head = (f"{'model':<10} {'engine':<14} {'prefill tok/s':>13} {'x llama.cpp':>11} {'decode tok/s':>12} "
            f"{'x llama.cpp':>11} {'MB/token':>9} {'bound tok/s':>11} {'% of bound':>10}")
    out = [f"memory copy bandwidth: {bandwidth / 1e9:.2f} GB/s (torch copy, read + write)", head, "-" * len(head)]
    for r in rows:
        ref = r.get("ref")
        bound = bandwidth / r["bytes"]
        ratio_p = f"{r['prefill'] / ref[0]:.2f}" if ref else "-"
        ratio_d = f"{r['decode'] / ref[1]:.2f}" if ref else "-"
        out.append(f"{r['model']:<10} {r['engine']:<14} {r['prefill']:>13.1f} {ratio_p:>11} {r['decode']:>12.2f} "
                   f"{ratio_d:>11} {r['bytes'] / 1e6:>9.1f} {bound:>11.1f} {r['decode'] / bound:>10.0%}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- kt bench


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="measure prefill and decode speed (against llama.cpp when installed)",
        description="Measure ktcore's prefill and decode tokens per second on MODEL (medians over repeats), "
                    "llama.cpp's on the same file with the same threads when llama-cpp-python is installed, "
                    "and the memory-bandwidth bound of decoding.",
        epilog=BENCH_EXAMPLES + "\n" + MODEL_OPTIONS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(p)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-llamacpp", action="store_true", help="do not run llama.cpp")
    p.add_argument("--sequential", action="store_true",
                   help="all ktcore runs, then all llama.cpp runs, one engine loaded at a time (default: both "
                        "loaded, one run of each per round, so load that comes and goes hits both alike)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed runs, one more ktcore run with the per-step phase profile printed")
    p.set_defaults(func=run, command="bench")
    return p


def run(args) -> int:
    return run_guarded(_bench, args)


def _bench(args) -> int:
    check_model_options(args)
    if args.prompt_tokens < 8 or args.gen_tokens < 1 or args.repeats < 1:
        raise CLIError("--prompt-tokens must be >= 8, --gen-tokens and --repeats >= 1")
    if args.max_context is not None and args.max_context < args.prompt_tokens + args.gen_tokens + 1:
        raise CLIError(f"--max-context {args.max_context} holds no {args.prompt_tokens}-token prompt and "
                       f"{args.gen_tokens} new tokens")
    import torch

    threads = args.threads or torch.get_num_threads()
    args.threads = threads
    args.max_context = args.max_context or args.prompt_tokens + args.gen_tokens + 16
    gen = warmed_generator(loaded := open_model(args), args)  # kt run's loading and warm-up
    ids = loaded.tokenizer(PROMPT_TEXT * (1 + args.prompt_tokens // 16))["input_ids"][: args.prompt_tokens]
    name = loaded.model.config.model_type
    ours_bytes = ktcore_active_bytes(loaded.model, loaded.source)
    del loaded
    if not args.no_llamacpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama-cpp-python is not installed: measuring ktcore alone", file=sys.stderr)
            args.no_llamacpp = True
    ours_runs, ref_runs = [], []
    if args.no_llamacpp or args.sequential:
        ours_runs = [bench_ktcore(gen, ids, args.gen_tokens, 1, warm_up=i == 0) for i in range(args.repeats)]
        if args.profile:
            profile_ktcore(gen, ids, args.gen_tokens)
        del gen
        if not args.no_llamacpp:
            with llamacpp_peer(args, threads) as peer:
                ref_runs = [peer.bench(ids, args.gen_tokens, warm_up=i == 0) for i in range(args.repeats)]
    else:
        with llamacpp_peer(args, threads) as peer:
            for i in range(args.repeats):  # alternate: one run of each engine per round
                ref_runs.append(peer.bench(ids, args.gen_tokens, warm_up=i == 0))
                ours_runs.append(bench_ktcore(gen, ids, args.gen_tokens, 1, warm_up=i == 0))
        if args.profile:
            profile_ktcore(gen, ids, args.gen_tokens)
        del gen
    ours = medians(ours_runs)
    rows, ref = [], None
    if ref_runs:
        ref = medians(ref_runs)
        rows.append({"model": name, "engine": "llama.cpp", "prefill": ref[0], "decode": ref[1],
                     "bytes": gguf_active_bytes(args.model), "ref": ref})
    rows.append({"model": name, "engine": "ktcore", "prefill": ours[0], "decode": ours[1], "bytes": ours_bytes,
                 "ref": ref})
    bandwidth = copy_bandwidth(threads)
    order = "ktcore alone" if not ref_runs else "sequential" if args.sequential else "alternating"
    print(f"threads={threads} prompt={len(ids)} tok decode={args.gen_tokens} tok repeats={args.repeats} "
          f"(medians, {order})")
    print(format_table(rows, bandwidth))
    if ref_runs:
        print(round_ratios(ours_runs, ref_runs))
    return 0


def llamacpp_peer(args, threads: int) -> LlamaCppProcess:
    """llama.cpp on ``args.model`` in a process of its own (``ktcore.cli.llamacpp_peer``), loaded as
    ``load_llamacpp`` loads it."""
    overrides = llamacpp_overrides(args.model)
    extra = llamacpp_extra_bufts_work(str(args.model), tuple(sorted((overrides or {}).items())))
    return LlamaCppProcess(args.model, threads, args.max_context, extra_bufts=extra, kv_overrides=overrides)


def medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def round_ratios(ours_runs, ref_runs) -> str:
    """ktcore over llama.cpp, the median of the per-round ratios (round i: run i of each engine)."""
    prefill = statistics.median(o[0] / r[0] for o, r in zip(ours_runs, ref_runs))
    decode = statistics.median(o[1] / r[1] for o, r in zip(ours_runs, ref_runs))
    return (f"ktcore / llama.cpp, median of {len(ours_runs)} per-round ratios: prefill {prefill:.2f}x, "
            f"decode {decode:.2f}x")


def profile_ktcore(gen, prompt_ids, gen_tokens: int) -> None:
    """One more ktcore run with the per-step phase profile (``ktcore.engine.step_profile``), printed."""
    from ktcore.engine.step_profile import StepProfile
    from ktcore.generate import SamplingParams

    from .run import print_profile

    profile = StepProfile()
    with profile.active():
        for _ in gen.generate_ids(prompt_ids, SamplingParams(max_new_tokens=gen_tokens + 1, ignore_eos=True)):
            pass
    print_profile(profile)
