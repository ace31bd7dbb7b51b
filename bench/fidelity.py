"""Fidelity of ktcore against plain Transformers and llama.cpp on the same GGUF files.

For each model:
- greedy 32 tokens for fixed prompts: ktcore (injected, rules) versus Transformers loading the same GGUF
  (fp32) — must be identical — and versus llama.cpp (reported: length of the common prefix);
- teacher forcing over ``tests/data/public_domain_text.txt`` (ids from llama.cpp's tokenizer, fed to
  both engines): top-1 agreement of next-token predictions, mean KL(llama.cpp || ktcore), perplexities.

    python bench/fidelity.py --threads 2
    python bench/fidelity.py --models smollm2 --rules my-rules.yaml

llama.cpp's quantized kernels differ between its builds (AVX2, AVX512, ...), so on a quantized file no
build is *the* reference. ``--llama-libs`` scores ktcore against several builds (each a directory holding
its ``libllama.so``, loaded in a subprocess of its own) and the builds against each other:

    python bench/fidelity.py --threads 16 --no-transformers --llama-libs /opt/llama-avx2,/opt/llama-avx512

The quality cost of KMoE's speed options (expert deferral ``defer``, selective experts ``top_k``, see
ktcore.moe) beside what they buy: ``--moe-options`` loads a MoE GGUF (``--model-path``; default the
bench_hybrid synthetic DeepSeek-V2-Lite shape, ``--tiny`` its small widths) with the shipped rule file, once
as is and once per variant (the same file with that KMoE option, written by ktcore.placement.placement_rules,
as ``kt rules suggest`` writes it), and reports teacher-forced top-1 agreement and mean KL(full || variant)
over ``--tokens`` positions, with each one's decode tok/s and the ratio:

    python bench/fidelity.py --moe-options "defer=1;top_k=4;defer=1,top_k=5" --tiny --threads 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import ktcore  # noqa: F401,E402  (before torch: the OpenMP wait policy ktcore sets, see ktcore/__init__.py)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import (  # noqa: E402
    ModelUnavailable,
    fixed_text,
    gemma3_gguf,
    llamacpp_tokens,
    load_ktcore,
    load_llamacpp,
    load_transformers,
    smollm2_gguf,
)

MODELS = {"smollm2": smollm2_gguf, "gemma3": gemma3_gguf}
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
)
GREEDY_TOKENS = 32
TARGET_AGREEMENT = 0.95
TARGET_PPL_REL = 0.02


def llamacpp_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits ``[len(ids), V]`` (the model must be built with ``logits_all=True``)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llamacpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def teacher_forced_stats(kt_logprobs: torch.Tensor, ref_logits: np.ndarray, ids: list[int]) -> dict:
    """Compare next-token distributions at every position but the last (which predicts past the text)."""
    vocab = min(kt_logprobs.shape[-1], ref_logits.shape[-1])
    kt = kt_logprobs[:-1, :vocab].double()
    ref = torch.from_numpy(ref_logits[:-1, :vocab]).double().log_softmax(-1)
    kt = kt - kt.logsumexp(-1, keepdim=True)  # renormalize after the vocab cut (no-op when equal)
    target = torch.tensor(ids[1:]).unsqueeze(1)
    kl = (ref.exp() * (ref - kt)).sum(-1)
    return {
        "positions": len(ids) - 1,
        "agreement": float((kt.argmax(-1) == ref.argmax(-1)).double().mean()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "ppl_ktcore": math.exp(-float(kt.gather(1, target).mean())),
        "ppl_llamacpp": math.exp(-float(ref.gather(1, target).mean())),
    }


def greedy_vs_transformers(gen, path, threads, prompts=PROMPTS, n=GREEDY_TOKENS) -> list[dict]:
    """ktcore's greedy tokens against Transformers' ``generate`` on the same GGUF, same prompt ids."""
    from ktcore.generate import SamplingParams

    hf = load_transformers(path, threads)
    rows = []
    for prompt in prompts:
        ids = gen.encode(prompt)
        ours = list(gen.generate_ids(ids, SamplingParams(max_new_tokens=n, ignore_eos=True)))
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=n, do_sample=False, top_k=None, top_p=None)[0, len(ids):].tolist()
        # Transformers stops after an end token; ktcore was told to go on, so compare what both produced
        rows.append({"prompt": prompt, "ktcore": ours, "transformers": ref, "same": ours[: len(ref)] == ref})
    del hf
    return rows


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def evaluate(name: str, threads: int, rules=None, max_tokens: int = 512, with_transformers: bool = True) -> dict:
    path = MODELS[name]()
    gen, load_s = load_ktcore(path, rules=rules, threads=threads, max_context=max(1024, max_tokens + 64))
    llm = load_llamacpp(path, threads=threads, n_ctx=max_tokens + 64, logits_all=True, exact_kv=True)
    ids = llamacpp_tokens(llm, fixed_text())[:max_tokens]
    stats = teacher_forced_stats(gen.score(ids), llamacpp_logits(llm, ids), ids)
    result = {"model": name, "path": str(path), "load_s": load_s, **stats}
    from ktcore.generate import SamplingParams

    prefixes = []
    for prompt in PROMPTS:
        prompt_ids = llamacpp_tokens(llm, prompt)
        ours = list(gen.generate_ids(prompt_ids, SamplingParams(max_new_tokens=GREEDY_TOKENS, ignore_eos=True)))
        prefixes.append(common_prefix(ours, llamacpp_greedy(llm, prompt_ids, GREEDY_TOKENS)))
    result["greedy_prefix_vs_llamacpp"] = prefixes
    if with_transformers:
        result["greedy_vs_transformers"] = greedy_vs_transformers(gen, path, threads)
    return result


def logits_from_build(lib_dir: str, path, ids: list[int], threads: int) -> np.ndarray:
    """llama.cpp's teacher-forced logits from the build whose libraries are in ``lib_dir`` (a subprocess:
    a process can load one ``libllama`` only)."""
    with tempfile.TemporaryDirectory() as tmp:
        ids_file, out = Path(tmp) / "ids.json", Path(tmp) / "logits.npy"
        ids_file.write_text(json.dumps(ids))
        env = {**os.environ, "LLAMA_CPP_LIB_PATH": lib_dir,
               "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [lib_dir, os.environ.get("LD_LIBRARY_PATH")]))}
        cmd = [sys.executable, __file__, "--dump-logits", str(path), str(ids_file), str(out), "--threads", str(threads)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"llama.cpp build {lib_dir} failed on {path}:\n{done.stderr[-2000:]}")
        return np.load(out)


def compare_builds(name: str, threads: int, rules, max_tokens: int, lib_dirs: list[str]) -> list[str]:
    """Rows: ktcore against each llama.cpp build, then each pair of builds against each other."""
    path = MODELS[name]()
    gen, _ = load_ktcore(path, rules=rules, threads=threads, max_context=max(1024, max_tokens + 64))
    llm = load_llamacpp(path, threads=threads, n_ctx=max_tokens + 64)
    ids = llamacpp_tokens(llm, fixed_text())[:max_tokens]
    del llm
    ours = gen.score(ids)
    refs = {d: logits_from_build(d, path, ids, threads) for d in lib_dirs}
    rows = []
    for d, ref in refs.items():
        st = teacher_forced_stats(ours, ref, ids)
        rows.append(f"{name:<9} ktcore vs {d}: top-1 {st['agreement']:.2%}, mean KL {st['mean_kl']:.5f}, "
                    f"ppl {st['ppl_ktcore']:.3f} vs {st['ppl_llamacpp']:.3f}")
    for a, b in itertools.combinations(lib_dirs, 2):
        st = teacher_forced_stats(torch.from_numpy(refs[b]).log_softmax(-1), refs[a], ids)
        rows.append(f"{name:<9} {b} vs {a}: top-1 {st['agreement']:.2%}, mean KL {st['mean_kl']:.5f}, "
                    f"ppl {st['ppl_ktcore']:.3f} vs {st['ppl_llamacpp']:.3f}")
    return rows


def _dump_logits(path: str, ids_file: str, out: str, threads: int) -> int:
    ids = json.loads(Path(ids_file).read_text())
    llm = load_llamacpp(path, threads=threads, n_ctx=len(ids) + 64, logits_all=True, exact_kv=True)
    np.save(out, llamacpp_logits(llm, ids))
    return 0


def parse_variants(text: str) -> list[dict]:
    """``"defer=1;top_k=4;defer=1,top_k=5"`` -> ``[{"defer": 1}, {"top_k": 4}, {"defer": 1, "top_k": 5}]``."""
    variants = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        options = {}
        for item in part.split(","):
            key, _, value = item.partition("=")
            if not value:
                raise SystemExit(f"--moe-options: {item!r} is not KEY=VALUE")
            options[key.strip()] = int(value)
        variants.append(options)
    return variants


def moe_option_cost(path, variants: list[dict], threads: int, tokens: int, gen_tokens: int, repeats: int,
                    device: str) -> list[str]:
    """Rows: each KMoE option variant against the full model (agreement, KL, decode speed)."""
    from bench_hybrid import pick_rules, prompt_ids

    from ktcore.cli.bench import bench_ktcore
    from ktcore.placement import placement_rules

    base = pick_rules("gpu-cpu" if device == "cuda" else "cpu")
    rows = []
    scratch = Path(tempfile.mkdtemp())

    def load(options: dict):  # the full model: the shipped file itself; a variant: kt rules suggest's file with it
        rules = base
        if options:
            rules = scratch / ("_".join(f"{k}{v}" for k, v in options.items()) + ".yaml")
            rules.write_text(placement_rules(base.read_text(), options=options, device=device))
        return load_ktcore(path, rules=rules, threads=threads, max_context=max(1024, tokens + gen_tokens + 64),
                           device=None)[0]

    full = load({})
    ids = prompt_ids(full.model.config.vocab_size, tokens)
    reference = full.score(ids)
    first_speed = bench_ktcore(full, ids[:64], gen_tokens, repeats)[1]
    measured = []
    for options in variants:
        gen = load(options)
        st = teacher_forced_stats(gen.score(ids), reference.float().numpy(), ids)
        measured.append((options, st, bench_ktcore(gen, ids[:64], gen_tokens, repeats)[1]))
        del gen
    last_speed = bench_ktcore(full, ids[:64], gen_tokens, repeats)[1]  # again: no advantage to either order
    full_speed = (first_speed + last_speed) / 2
    rows.append(f"{'full model (before / after)':<34} {'-':>11} {'-':>9} {full_speed:>12.2f} {1.0:>8.2f}"
                f"   ({first_speed:.2f} / {last_speed:.2f})")
    for options, st, speed in measured:
        label = ", ".join(f"{k}={v}" for k, v in options.items())
        rows.append(f"{label:<34} {st['agreement']:>11.2%} {st['mean_kl']:>9.2e} {speed:>12.2f} {speed / full_speed:>8.2f}")
    head = f"{'variant':<34} {'top-1 agree':>11} {'mean KL':>9} {'decode tok/s':>12} {'x full':>8}"
    return [head, "-" * len(head), *rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,gemma3", help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rules", default=None, help="rule file for ktcore (default: the shipped one)")
    ap.add_argument("--tokens", type=int, default=512, help="teacher-forced text length in tokens")
    ap.add_argument("--no-transformers", action="store_true", help="skip the plain-Transformers greedy check")
    ap.add_argument("--llama-libs", default=None,
                    help="comma-separated directories of llama.cpp builds: score ktcore against each, and the builds "
                         "against each other (teacher forcing only)")
    ap.add_argument("--moe-options", default=None,
                    help="KMoE option variants to cost, ';'-separated, each KEY=VALUE[,KEY=VALUE] (defer, top_k)")
    ap.add_argument("--model-path", default=None, help="MoE GGUF for --moe-options (default: the synthetic V2-Lite shape)")
    ap.add_argument("--tiny", action="store_true", help="--moe-options on bench_hybrid's small-width synthetic model")
    ap.add_argument("--gen-tokens", type=int, default=16, help="decode steps timed per variant (--moe-options)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                    help="--moe-options: the gpu-cpu (cuda) or cpu shipped layout")
    ap.add_argument("--dump-logits", nargs=3, metavar=("GGUF", "IDS_JSON", "OUT_NPY"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.dump_logits:
        return _dump_logits(*args.dump_logits, threads=args.threads)
    if args.moe_options:
        from bench_hybrid import synthetic_moe_gguf, tiny_gguf

        path = args.model_path or (tiny_gguf() if args.tiny else synthetic_moe_gguf(27))
        print(f"model: {path}; teacher forcing over {args.tokens} positions, decode {args.gen_tokens} steps")
        print("\n".join(moe_option_cost(path, parse_variants(args.moe_options), args.threads, args.tokens,
                                        args.gen_tokens, args.repeats, args.device)))
        return 0
    if args.llama_libs:
        for name in args.models.split(","):
            try:
                print("\n".join(compare_builds(name, args.threads, args.rules, args.tokens, args.llama_libs.split(","))))
            except ModelUnavailable as exc:
                print(f"{name:<9} skipped: {exc}")
        return 0
    header = f"{'model':<9} {'tokens':>6} {'top-1 agree':>11} {'mean KL':>9} {'ppl ktcore':>10} {'ppl llama.cpp':>13} " \
             f"{'ppl diff':>8} {'greedy = HF':>11} {'prefix = llama.cpp':>18}"
    lines, ok = [header, "-" * len(header)], True
    for name in args.models.split(","):
        try:
            r = evaluate(name, args.threads, args.rules, args.tokens, not args.no_transformers)
        except ModelUnavailable as exc:
            lines.append(f"{name:<9} skipped: {exc}")
            continue
        rel = r["ppl_ktcore"] / r["ppl_llamacpp"] - 1
        same = r.get("greedy_vs_transformers")
        same_txt = f"{sum(x['same'] for x in same)}/{len(same)}" if same else "-"
        prefix_txt = "/".join(str(p) for p in r["greedy_prefix_vs_llamacpp"]) + f" of {GREEDY_TOKENS}"
        lines.append(f"{name:<9} {r['positions']:>6} {r['agreement']:>11.2%} {r['mean_kl']:>9.5f} "
                     f"{r['ppl_ktcore']:>10.3f} {r['ppl_llamacpp']:>13.3f} {rel:>+8.2%} {same_txt:>11} {prefix_txt:>18}")
        ok &= r["agreement"] >= TARGET_AGREEMENT and abs(rel) <= TARGET_PPL_REL and (not same or all(x["same"] for x in same))
    print("\n".join(lines))
    print(f"targets: top-1 agreement >= {TARGET_AGREEMENT:.0%}, |ppl diff| <= {TARGET_PPL_REL:.0%}, greedy = HF: all")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
