"""Autotune choices on disk (ktcore.tune_cache): the next process gets the stored choice without timing."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from ktcore.sdk import TuneCache, cache_dir


@dataclass(frozen=True)
class Tile:
    block_n: int
    block_k: int


CANDIDATES = [Tile(32, 512), Tile(16, 1024), Tile(8, 256)]
SPEED = {Tile(32, 512): 3.0, Tile(16, 1024): 1.0, Tile(8, 256): 2.0}


class Timer:
    def __init__(self):
        self.calls = []

    def __call__(self, tile):
        self.calls.append(tile)
        return SPEED[tile]


def test_fastest_is_chosen_stored_and_read_by_the_next_process(tmp_path):
    timer = Timer()
    first = TuneCache("int4", "GPU X sm90", tmp_path)
    assert first.choice((1, 4096, 4096), CANDIDATES, timer) == Tile(16, 1024)
    assert timer.calls == CANDIDATES
    assert first.choice((1, 4096, 4096), CANDIDATES, timer) == Tile(16, 1024)  # remembered: not timed again
    assert len(timer.calls) == 3
    stored = json.loads(first.path.read_text())
    assert stored == {repr((1, 4096, 4096)): {"block_n": 16, "block_k": 1024}}

    later = Timer()
    second = TuneCache("int4", "GPU X sm90", tmp_path)  # what a new process builds
    assert second.choice((1, 4096, 4096), CANDIDATES, later) == Tile(16, 1024)
    assert later.calls == []
    assert second.choice((4, 4096, 4096), CANDIDATES, later) == Tile(16, 1024)  # another problem is timed
    assert len(later.calls) == 3
    assert set(json.loads(second.path.read_text())) == {repr((1, 4096, 4096)), repr((4, 4096, 4096))}


def test_devices_do_not_share_choices_and_a_stale_choice_is_timed_again(tmp_path):
    TuneCache("int4", "GPU X sm90", tmp_path).choice("p", CANDIDATES, Timer())
    other = Timer()
    assert TuneCache("int4", "GPU Y sm80", tmp_path).choice("p", CANDIDATES, other) == Tile(16, 1024)
    assert other.calls == CANDIDATES  # another GPU model: its own file, timed there
    fewer = [Tile(32, 512), Tile(8, 256)]  # the stored winner is no candidate any more (a code change)
    again = Timer()
    assert TuneCache("int4", "GPU X sm90", tmp_path).choice("p", fewer, again) == Tile(8, 256)
    assert again.calls == fewer


def test_failing_candidates_are_skipped_and_nothing_runs_gives_the_first_unstored(tmp_path):
    def only_small(tile):
        if tile.block_k > 256:
            raise RuntimeError("out of shared memory")
        return 1.0

    cache = TuneCache("int4", "GPU X", tmp_path)
    assert cache.choice("p", CANDIDATES, only_small) == Tile(8, 256)

    def nothing(tile):
        raise RuntimeError("no GPU")

    assert cache.choice("q", CANDIDATES, nothing) == Tile(32, 512)
    assert repr("q") not in json.loads(cache.path.read_text())


def test_unwritable_folder_keeps_choices_in_memory(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = TuneCache("int4", "GPU X", blocker / "autotune")
    timer = Timer()
    with caplog.at_level(logging.WARNING, logger="ktcore.tune_cache"):
        assert cache.choice("p", CANDIDATES, timer) == Tile(16, 1024)
        assert cache.choice("r", CANDIDATES, timer) == Tile(16, 1024)
    assert len(caplog.records) == 1 and "choices stay in memory" in caplog.text


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KTCORE_CACHE", str(tmp_path / "kt"))
    assert cache_dir() == tmp_path / "kt"
    monkeypatch.delenv("KTCORE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "ktcore"
    assert TuneCache("int4", "NVIDIA H200 sm90").path.parent == tmp_path / "xdg" / "ktcore" / "autotune"
