"""Where a CPU decode step's time goes: experts, dense linears, attention, norms / rotary / routing, the kernel
pool's barrier waits, and Python (everything else), in milliseconds per step, for ktcore's fused decode and for
the module-by-module path (``KT_CPU_FUSE=0`` semantics), same model, same run.

The model loads through the CLI's code path (``load_model`` with the shipped rules, ``Generator``). kt-cpu-amx's
runtimes count their blocking calls' time per phase on the calling thread (``Runtime.profile``: GEMMs and
activation quantization, experts, attention, small ops, and waits for the pool's other threads, left out of the
others); torch modules outside the kernels (attention ops, RMSNorms, rotary modules, routers) are timed by
forward hooks, exclusive of the kernel time and of nested timed modules inside them. What is left of the step's
wall time is Python and torch glue. The hooks cost a few microseconds per module call on the module path.

    python bench/profile_decode.py smollm2 --threads 2
    python bench/profile_decode.py moe:27 --threads 16 --steps 32
    python bench/profile_decode.py path/to/model.gguf
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import ktcore  # noqa: F401,E402  (before torch: the OpenMP wait policy ktcore sets, see ktcore/__init__.py)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import fixed_text, load_ktcore, smollm2_gguf  # noqa: E402

KERNEL_PHASES = {"experts": "experts", "dense": "dense linears", "attention": "attention",
                 "small": "norms/rope/routing", "waiting": "waiting"}
COLUMNS = ["experts", "dense linears", "attention", "norms/rope/routing", "waiting", "python/other"]


def module_category(module) -> str | None:
    from ktcore.modules import KAttention, KRoPE

    name = type(module).__name__
    if isinstance(module, KAttention) or name.endswith("Attention"):
        return "attention"
    if isinstance(module, KRoPE) or name.endswith(("RMSNorm", "RotaryEmbedding", "Router")):
        return "norms/rope/routing"
    return None


class Profiler:
    """Partitions wall time between hooked torch modules, the kernels' phases and the rest."""

    def __init__(self, model, runtimes):
        self.runtimes = runtimes
        self.stack: list[str] = []
        self.totals = dict.fromkeys(COLUMNS, 0.0)
        self.handles = []
        for module in model.modules():
            category = module_category(module)
            if category is not None:
                self.handles.append(module.register_forward_pre_hook(lambda m, a, c=category: self.enter(c)))
                self.handles.append(module.register_forward_hook(lambda m, a, o: self.leave()))
        self.reset()

    def kernel_seconds(self) -> float:
        return sum(sum(rt.profile().values()) for rt in self.runtimes)

    def reset(self):
        for rt in self.runtimes:
            rt.reset_profile()
        self.totals = dict.fromkeys(COLUMNS, 0.0)
        self.t, self.k = time.perf_counter(), 0.0

    def charge(self):
        t, k = time.perf_counter(), self.kernel_seconds()
        self.totals[self.stack[-1] if self.stack else "python/other"] += max(0.0, (t - self.t) - (k - self.k))
        self.t, self.k = t, k

    def enter(self, category):
        self.charge()
        self.stack.append(category)

    def leave(self):
        self.charge()
        self.stack.pop()

    def finish(self) -> dict[str, float]:
        self.charge()
        for rt in self.runtimes:
            for phase, seconds in rt.profile().items():
                self.totals[KERNEL_PHASES[phase]] += seconds
        return dict(self.totals)

    def remove(self):
        for h in self.handles:
            h.remove()


def parallel_phases(runtimes) -> int:
    """The kernel pools' parallel phases (barriers) so far."""
    return sum(rt.parallel_phases for rt in runtimes)


def profile(gen, prompt_ids, steps: int) -> tuple[float, dict[str, float]]:
    """(wall ms per decode step, ms per category per step) over ``steps`` decode steps after a prefill; the
    categories' dict also holds ``barriers``: the kernel pools' parallel phases per step."""
    from kt_cpu_amx.runtime import _runtimes
    from ktcore.generate import SamplingParams

    params = SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
    list(gen.generate_ids(prompt_ids, params))  # warm: plans, first-touch pages
    prof = Profiler(gen.model, list(_runtimes.values()))
    try:
        tokens = gen.generate_ids(prompt_ids, params)
        next(tokens)  # the prefill's token
        prof.reset()
        phases0 = parallel_phases(prof.runtimes)
        t0 = time.perf_counter()
        for _ in tokens:
            pass
        wall = time.perf_counter() - t0
        parts = prof.finish()
        barriers = (parallel_phases(prof.runtimes) - phases0) / steps
    finally:
        prof.remove()
    return wall / steps * 1e3, {**{k: v / steps * 1e3 for k, v in parts.items()}, "barriers": barriers}


def model_path(spec: str) -> Path:
    if spec == "smollm2":
        return smollm2_gguf()
    if spec.startswith("moe:"):
        from bench_decode import synthetic_moe_gguf

        return synthetic_moe_gguf(int(spec.split(":")[1]))
    return Path(spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="smollm2, moe:LAYERS (the synthetic DeepSeek-V2-Lite shape) or a GGUF path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--rules", default=None, help="rule file (default: the shipped one)")
    args = ap.parse_args(argv)
    from kt_cpu_amx import fusion

    path = model_path(args.model)
    gen, _ = load_ktcore(path, rules=args.rules, threads=args.threads, max_context=args.prompt_tokens + args.steps + 8)
    prompt_ids = gen.encode(fixed_text())[: args.prompt_tokens]
    rows, declined = [], None
    for mode in ("fused", "modules"):
        fusion.ENABLED = mode == "fused"
        gen.engine.runner._fused = None  # plan again under the switch
        wall, parts = profile(gen, prompt_ids, args.steps)
        if mode == "fused" and gen.fused_problem is not None:
            mode, declined = "modules*", gen.fused_problem
        rows.append((mode, wall, parts))
    head = f"{'path':<9} {'ms/step':>8} " + " ".join(f"{c:>18}" for c in COLUMNS) + f" {'barriers/step':>14}"
    print(f"{path.name}  threads={args.threads}  steps={args.steps}  prompt={len(prompt_ids)} tok")
    print(head)
    print("-" * len(head))
    for mode, wall, parts in rows:
        cells = " ".join(f"{parts[c]:>9.2f} ({parts[c] / wall:>4.0%})" for c in COLUMNS)
        print(f"{mode:<9} {wall:>8.2f} {cells} {parts['barriers']:>14.0f}")
    if declined:
        print(f"(* fused decode unavailable: {declined})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
