"""Autotune choices kept on disk, per device and problem, so that the next process starts tuned.

A kernel that times candidate launch configurations per problem (kt-cuda's int4 GEMM: ``tuned_config``)
asks ``TuneCache.choice(problem, candidates, time)``: the choice stored for this device and problem when it
is still one of the candidates, else the fastest candidate by ``time``, stored. One JSON file per tuner and
device under ``cache_dir()/autotune/`` (``{"<problem>": {candidate's fields}}``); a device is named by what
decides the timings (GPU model, compute capability, Triton and CUDA versions), so a file never carries
choices across GPUs or compiler versions. Files are written whole and renamed into place, merged with what
another process wrote meanwhile. Triton's own cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``)
already keeps the compiled kernels; this keeps which of them won.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("ktcore.tune_cache")
T = TypeVar("T")


def cache_dir() -> Path:
    """ktcore's cache folder: ``$KTCORE_CACHE``, else ``$XDG_CACHE_HOME/ktcore``, else ``~/.cache/ktcore``."""
    if os.environ.get("KTCORE_CACHE"):
        return Path(os.environ["KTCORE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ktcore"


def _fields(candidate) -> dict:
    return dataclasses.asdict(candidate) if dataclasses.is_dataclass(candidate) else {"value": candidate}


class TuneCache:
    """The choices of tuner ``name`` on ``device`` (a description such as ``"NVIDIA H200 sm90 triton3.5"``).
    ``directory``: default ``cache_dir() / "autotune"``; ``persist=False`` keeps choices in memory only.
    Candidates are dataclasses (stored as their fields) or JSON values. Thread-safe."""

    def __init__(self, name: str, device: str, directory: str | Path | None = None, persist: bool = True):
        self.name, self.device, self.persist = name, device, persist
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-{device}").strip("_")
        self.path = Path(directory if directory is not None else cache_dir() / "autotune") / f"{slug}.json"
        self._lock = threading.Lock()
        self._stored: dict[str, dict] | None = None  # read on first use
        self._memo: dict[Hashable, object] = {}

    def _read(self) -> dict[str, dict]:
        if not self.persist:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, NotADirectoryError):  # never written
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring the autotune cache %s: %s", self.path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, key: str, fields: dict) -> None:
        if not self.persist:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._read(), key: fields}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(merged, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only home: tune again next time, say so once
            if self.persist:
                log.warning("cannot write the autotune cache %s (%s); choices stay in memory", self.path, exc)
            self.persist = False

    def stored(self, problem: Hashable) -> dict | None:
        """The fields stored for ``problem`` (``None``: never tuned on this device)."""
        with self._lock:
            if self._stored is None:
                self._stored = self._read()
            return self._stored.get(repr(problem))

    def choice(self, problem: Hashable, candidates: Sequence[T], time: Callable[[T], float]) -> T:
        """The candidate for ``problem``: remembered in this process, else stored on disk (when still a
        candidate), else the one with the smallest ``time(candidate)`` (candidates whose timing raises are
        skipped; all failing gives the first), then stored."""
        if problem in self._memo:
            return self._memo[problem]
        fields = self.stored(problem)
        chosen = next((c for c in candidates if fields is not None and _fields(c) == fields), None)
        if chosen is None:
            timings = []
            for c in candidates:
                try:
                    timings.append((time(c), c))
                except Exception:  # noqa: BLE001 - a config this device cannot compile or launch: not a choice
                    continue
            if not timings:  # nothing ran: the first, not stored (the next process tries again)
                return candidates[0]
            chosen = min(timings, key=lambda t: t[0])[1]
            with self._lock:
                self._stored[repr(problem)] = _fields(chosen)
                self._write(repr(problem), _fields(chosen))
        self._memo[problem] = chosen
        return chosen
