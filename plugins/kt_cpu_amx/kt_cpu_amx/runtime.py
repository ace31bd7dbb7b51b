"""Which kernels can run here, and the shared C++ runtimes (thread pool + chosen ISA).

``KT_CPU_ISA=avx2|avx512|amx`` forces a path (it must be available: forcing a lower path on a better CPU
is how tests cover every path on one machine); ``KT_CPU_THREADS`` sets the pool size (default: the CPUs
this process may run on); ``KT_CPU_PIN=0`` leaves threads unpinned.
"""

from __future__ import annotations

import os
import platform
import threading
from functools import cache

ISA_ORDER = ("amx", "avx512", "avx2")  # best first

_lock = threading.Lock()
_runtimes: dict[tuple[int, str, bool], object] = {}


@cache
def _load():
    """The compiled module, or the ImportError explaining why not."""
    try:
        from . import _kernels
    except ImportError as exc:  # not built, or built for another platform
        return exc
    return _kernels


def kernels():
    mod = _load()
    if isinstance(mod, ImportError):
        raise ImportError(f"kt_cpu_amx: the C++ extension did not load ({mod}); reinstall with "
                          "`pip install ./plugins/kt_cpu_amx` on this machine") from mod
    return mod


def unavailable_reason(isa: str | None = None) -> str | None:
    """``None`` when the kernels can run here (with ``isa`` if given), else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"kt_cpu_amx needs an x86-64 CPU (this is {platform.machine()})"
    mod = _load()
    if isinstance(mod, ImportError):
        return f"the kt_cpu_amx extension did not load: {mod}"
    return mod.isa_unavailable_reason(isa or "avx2") or None


def isa_reasons() -> dict[str, str | None]:
    """Each ISA path and why it cannot run here (``None``: it can)."""
    return {isa: unavailable_reason(isa) for isa in ISA_ORDER}


def select_isa(requested: str | None = None) -> str:
    """The ISA to use: ``requested`` (or ``KT_CPU_ISA``) if given and available, else the best available."""
    requested = requested or os.environ.get("KT_CPU_ISA") or None
    if requested is not None:
        requested = requested.lower()
        if requested not in ISA_ORDER:
            raise ValueError(f"kt_cpu_amx: unknown ISA {requested!r} (KT_CPU_ISA / isa=); expected one of {ISA_ORDER}")
        why = unavailable_reason(requested)
        if why:
            raise RuntimeError(f"kt_cpu_amx: ISA {requested!r} was asked for but cannot run here: {why}")
        return requested
    for isa in ISA_ORDER:
        if unavailable_reason(isa) is None:
            return isa
    raise RuntimeError(f"kt_cpu_amx: no kernel path can run here: {unavailable_reason('avx2')}")


def default_threads() -> int:
    env = os.environ.get("KT_CPU_THREADS")
    if env:
        n = int(env)
        if n < 1:
            raise ValueError(f"KT_CPU_THREADS must be >= 1, got {env!r}")
        return n
    return len(os.sched_getaffinity(0))


def get_runtime(threads: int | None = None, isa: str | None = None):
    """The process-wide runtime for (threads, ISA): one thread pool each, created on first use."""
    threads = int(threads) if threads else default_threads()
    isa = select_isa(isa)
    pin = os.environ.get("KT_CPU_PIN", "1") != "0"
    key = (threads, isa, pin)
    with _lock:
        rt = _runtimes.get(key)
        if rt is None:
            rt = _runtimes[key] = kernels().Runtime(threads, isa, pin)
        return rt
