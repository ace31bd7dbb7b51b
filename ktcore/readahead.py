"""Start the kernel reading a model's files into the page cache while Python is still importing and building.

``read_ahead(paths)`` reads the files on a daemon thread and returns at once: ``sendfile`` to ``/dev/null`` in
chunks of 64 MiB, which fills the page cache without copying to user space, a few calls per file (each
releases the GIL while the disk works). Where ``sendfile`` fails it falls back to ``posix_fadvise(WILLNEED)``
per 128 KiB. Few calls matter: a thread that takes the GIL back after every chunk waits for the busy main thread
to hand it over (Python's 5 ms switch interval) and interrupts it each time; with 1,900 WILLNEED chunks (Gemma 3
270M's 241 MiB) it slowed a CPU-bound main thread by half and itself finished only when the main thread did.
The CLI calls it with MODEL as soon as the path is checked, before torch is imported; ``GGUFSource`` calls it
with the files it opened (a file already asked for is not asked for again). Files that together take more than half of
the memory available are left alone: reading them ahead would only push out pages that loading needs.

Needs no torch, so that it can run before the heavy imports.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

_started: set[str] = set()
_lock = threading.Lock()


def available_memory() -> int | None:
    """Bytes of host memory available now (``MemAvailable`` of /proc/meminfo; ``None``: unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_ahead(paths: Iterable[str | os.PathLike]) -> threading.Thread | None:
    """Start reading ``paths`` (regular files) into the page cache in the background; returns the thread,
    or ``None`` when nothing was started: no ``posix_fadvise`` here, no file left that was not asked for
    already, memory unknown, or the files take more than half of the memory available."""
    if not hasattr(os, "posix_fadvise"):
        return None
    files = []
    with _lock:
        for p in paths:
            key = os.path.realpath(p)
            if key not in _started and os.path.isfile(key):
                files.append(key)
        if not files:
            return None
        available = available_memory()
        if available is None or sum(os.path.getsize(f) for f in files) > available // 2:
            return None
        _started.update(files)
    thread = threading.Thread(target=_advise, args=(files,), name="ktcore-readahead", daemon=True)
    thread.start()
    return thread


SEND_CHUNK = 64 << 20
# Linux reads at most the device's readahead window per WILLNEED call (read_ahead_kb: 128 KiB by default,
# 8 MiB on some virtual disks), whatever length is asked for: the file is asked for in chunks of the default
CHUNK = 128 << 10


def _advise(files: list[str]) -> None:
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        null = None
    try:
        for path in files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                size = os.fstat(fd).st_size
                offset = _send(fd, null, size) if null is not None else 0
                for offset in range(offset, size, CHUNK):
                    os.posix_fadvise(fd, offset, CHUNK, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)
    finally:
        if null is not None:
            os.close(null)


def _send(fd: int, null: int, size: int) -> int:
    """Read ``fd`` into the page cache through ``sendfile`` to ``null``; returns how far it got."""
    offset = 0
    try:
        while offset < size:
            sent = os.sendfile(null, fd, offset, min(SEND_CHUNK, size - offset))
            if sent <= 0:
                break
            offset += sent
    except (OSError, AttributeError):  # AttributeError: no os.sendfile on this platform
        pass
    return offset


def forget() -> None:
    """Let every file be asked for again (tests, and a bench that drops a file from the cache between loads)."""
    with _lock:
        _started.clear()
