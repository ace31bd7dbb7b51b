"""Opt-in per-step phase profile of the engine (``kt run --profile``, ``kt bench --profile``): where one step's
wall time goes, so the gap between the kernels and the tokens per second is visible.

Phases, in milliseconds per step:
- ``fused layers``: the native call running every decoder layer (``ktcore.fused_decode``; CPU, one sequence);
- ``model forward``: an eager forward of the whole model (prefill chunks, decode steps that are not fused),
  output head included;
- ``embed + rope``: the token embedding and the rotary tables before the fused layers;
- ``output head``: the final norm and ``lm_head`` after the fused layers;
- ``sampling``: logits row -> token id (``Sequence.sample``);
- ``detokenize``: token -> reply text and stop strings (``ReplyText.push``/``finish``);
- ``engine python``: the rest of ``EngineCore.step`` (scheduling, cache bookkeeping, bookkeeping per sequence);
- ``between steps``: from the end of one step to the start of the next (the caller's loop: ``Generator``,
  printing the text).
The phases of a step sum to its wall time (the start of the step to the start of the next one). Timing costs
two ``perf_counter_ns`` calls per phase; when no profile is active each hook is one global lookup.
"""

from __future__ import annotations

import functools
import statistics
import time
from contextlib import contextmanager

PHASES = ("fused layers", "model forward", "embed + rope", "output head", "sampling", "detokenize",
          "engine python", "between steps")
MEASURED = PHASES[:6]  # timed directly; the last two are what is left of the step and the gap after it

_active: StepProfile | None = None


class StepProfile:
    """Phase times of every engine step while active (``with profile.active():``)."""

    def __init__(self):
        self.steps: list[dict] = []  # {"kind": "prefill" | "decode", "tokens": n, "wall_ns": ..., phase: ns}
        self._current: dict | None = None
        self._last_end: int | None = None

    @contextmanager
    def active(self):
        global _active
        previous, _active = _active, self
        self._last_end = None
        try:
            yield self
        finally:
            _active = previous

    # -- hooks

    def begin_step(self) -> None:
        now = time.perf_counter_ns()
        if self._last_end is not None and self.steps:
            self.steps[-1]["between steps"] = now - self._last_end
        self._current = {"kind": "decode", "tokens": 0, "start_ns": now}

    def end_step(self, tokens: int, kind: str) -> None:
        step, self._current = self._current, None
        if step is None:
            return
        now = time.perf_counter_ns()
        step.update(kind=kind, tokens=tokens, step_ns=now - step.pop("start_ns"))
        step["engine python"] = step["step_ns"] - sum(step.get(p, 0) for p in MEASURED)
        step["between steps"] = 0
        self.steps.append(step)
        self._last_end = now

    def add(self, phase: str, ns: int) -> None:
        if self._current is not None:
            self._current[phase] = self._current.get(phase, 0) + ns

    # -- results

    def rows(self, kind: str = "decode") -> list[dict]:
        """Per step of ``kind``: milliseconds per phase and ``wall`` (the step plus the gap after it). The last
        step of a request has no gap measured after it."""
        out = []
        for s in self.steps:
            if s["kind"] != kind:
                continue
            row = {p: s.get(p, 0) / 1e6 for p in PHASES}
            row["wall"] = (s["step_ns"] + s.get("between steps", 0)) / 1e6
            out.append(row)
        return out

    def report(self, kind: str = "decode") -> str:
        """A table of the median and mean milliseconds per phase over the steps of ``kind``."""
        rows = self.rows(kind)
        if not rows:
            return f"step profile: no {kind} steps"
        head = f"step profile, {kind}: {len(rows)} steps, ms per step"
        lines = [head, f"  {'phase':<15} {'median':>8} {'mean':>8} {'share':>6}"]
        wall = statistics.fmean(r["wall"] for r in rows)
        for p in PHASES:
            vals = [r[p] for r in rows]
            if not any(vals):
                continue
            mean = statistics.fmean(vals)
            lines.append(f"  {p:<15} {statistics.median(vals):>8.2f} {mean:>8.2f} {mean / wall:>6.0%}")
        lines.append(f"  {'step wall':<15} {statistics.median(r['wall'] for r in rows):>8.2f} {wall:>8.2f}")
        return "\n".join(lines)


# -- hooks the engine calls (no-ops unless a profile is active)


def profiled_step(step):
    """Decorator of ``EngineCore.step``: brackets each step. The step's kind and token count come from the
    runner's ``tokens_fed`` (one token per sequence: decode)."""

    @functools.wraps(step)
    def wrapper(engine, *args, **kwargs):
        prof = _active
        if prof is None:
            return step(engine, *args, **kwargs)
        fed = engine.runner.tokens_fed
        prof.begin_step()
        try:
            return step(engine, *args, **kwargs)
        finally:
            tokens = engine.runner.tokens_fed - fed
            decoding = len(engine.scheduler.running) if tokens else 0
            prof.end_step(tokens, "decode" if tokens and tokens <= max(1, decoding) else "prefill")

    return wrapper


@contextmanager
def phase(name: str):
    """Time the block as ``name`` in the active profile's current step."""
    prof = _active
    if prof is None:
        yield
        return
    t0 = time.perf_counter_ns()
    try:
        yield
    finally:
        prof.add(name, time.perf_counter_ns() - t0)


def timed(name: str):
    """Decorator: time every call of the function as phase ``name``."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            prof = _active
            if prof is None:
                return fn(*args, **kwargs)
            t0 = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                prof.add(name, time.perf_counter_ns() - t0)

        return wrapper

    return deco
