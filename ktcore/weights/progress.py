"""Progress while loading weights: a tqdm bar counting bytes and naming the tensor being read."""

from __future__ import annotations

import sys


class LoadProgress:
    """``with LoadProgress(total_bytes) as p: p.advance(name, nbytes)``.

    ``enabled=None`` shows the bar only when stderr is a terminal."""

    def __init__(self, total_bytes: int, desc: str = "loading weights", enabled: bool | None = None):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)
        self.done_bytes = 0
        self.done_tensors = 0

    def advance(self, name: str, nbytes: int) -> None:
        self.done_bytes += nbytes
        self.done_tensors += 1
        if self._bar is not None:
            self._bar.set_postfix_str(name, refresh=False)
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "LoadProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
