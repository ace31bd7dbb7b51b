"""Which kernels can run here, and the shared C++ runtimes (thread pool + chosen ISA).

``KT_CPU_ISA=avx2|avx512|amx`` forces a path (it must be available: forcing a lower path on a better CPU
is how tests cover every path on one machine); ``KT_CPU_THREADS`` sets the pool size (default: ``OMP_NUM_THREADS``,
which `kt run/chat/serve --threads` set, else the CPUs this process may run on); ``KT_CPU_PIN=0`` leaves threads unpinned.

Cores between the pool and torch (decided here only): the kernels run on the calling thread plus the pool's
workers, pinned one per CPU. torch's own intra-op (OpenMP) threads run the ops between two kernel calls
(attention, norms, RoPE); during decode those are tiny, and torch threads that spin after them take cores
from the pool's workers (on 2 cores decode ran 2x slower with torch at 2 threads). So for decode-sized
calls (at most ``DECODE_ROWS`` rows) torch gets the CPUs the pool leaves over, at least 1
(``KT_CPU_TORCH_THREADS=N`` sets that number; ``0`` leaves torch alone); a larger (prefill) call gives
torch back the thread count it had before.
"""

from __future__ import annotations

import os
import platform
import threading
from functools import cache

import torch

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
    _install_iq_tables(_kernels)
    return _kernels


def _install_iq_tables(mod) -> None:
    """The i-quants' lattice grids and sign table from ktcore's type table (gguf-py's own), and the IQ4_NL and
    MXFP4 (doubled e2m1) values, into the C++ decoders: one copy of each table, read from the format's reference."""
    from ktcore.sdk import IQ4_NL_VALUES, MXFP4_VALUES, lookup_tables

    done = set()
    for name in mod.iq_types():
        for table_name, table in zip(_table_names(name), lookup_tables(name, "cpu")):
            if table_name not in done:
                mod.set_iq_table(table_name, table.to(torch.int8).numpy().tobytes())
                done.add(table_name)
    mod.set_iq_table("IQ4_NL", torch.tensor(IQ4_NL_VALUES, dtype=torch.int8).numpy().tobytes())
    mod.set_iq_table("MXFP4", torch.tensor(MXFP4_VALUES, dtype=torch.int8).numpy().tobytes())


def _table_names(type_name: str) -> tuple[str, ...]:
    from ktcore.sdk import GGML_TYPES

    return GGML_TYPES[type_name].lookup_tables


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
    for var in ("KT_CPU_THREADS", "OMP_NUM_THREADS"):
        env = os.environ.get(var)
        if env:
            n = int(env)
            if n < 1:
                raise ValueError(f"{var} must be >= 1, got {env!r}")
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


DECODE_ROWS = 8
_saved_torch_threads: int | None = None  # torch's own count while the decode share is in force


def torch_decode_threads(pool_threads: int) -> int | None:
    """torch's intra-op threads while the pool decodes (``None``: leave torch alone)."""
    env = os.environ.get("KT_CPU_TORCH_THREADS")
    if env:
        n = int(env)
        if n < 0:
            raise ValueError(f"KT_CPU_TORCH_THREADS must be >= 0, got {env!r}")
        return n or None
    return max(1, len(os.sched_getaffinity(0)) - pool_threads)


def share_cores(rows: int, decode_threads: int | None) -> None:
    """Give torch its decode share of the cores before a call of ``rows`` rows, or its own count back
    before a larger one. Cheap when nothing changes (one ``get_num_threads``)."""
    global _saved_torch_threads
    if decode_threads is None:
        return
    current = torch.get_num_threads()
    if rows <= DECODE_ROWS:
        if current != decode_threads:
            if _saved_torch_threads is None:
                _saved_torch_threads = current
            torch.set_num_threads(decode_threads)
    elif _saved_torch_threads is not None:
        if current == decode_threads:  # nobody changed it meanwhile
            torch.set_num_threads(_saved_torch_threads)
        _saved_torch_threads = None
