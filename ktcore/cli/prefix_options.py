"""The prefix cache's command-line options (``kt serve``, ``kt chat``), apart from ``ktcore.prefix_cache`` so that
building the parser imports no torch."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_RAM = "4GiB"


def default_dir() -> Path:
    """``prefix`` in ktcore's cache folder (``ktcore.tune_cache.cache_dir``)."""
    from ..tune_cache import cache_dir

    return cache_dir() / "prefix"


def _size(text: str) -> int:
    from ktcore.placement import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of tokens")
    return int(text)


def add_prefix_cache_args(p: argparse.ArgumentParser) -> None:
    """``--prefix-cache-gpu``, ``--prefix-cache-ram``, ``--prefix-cache-disk``, ``--prefix-cache-dir``,
    ``--prefix-block``."""
    g = p.add_argument_group(
        "prefix cache",
        "The keys and values of prompt blocks already computed are kept and restored, bit-exact, when a later "
        "prompt starts with the same tokens (a chat's earlier turns, a shared system prompt), so only the new "
        "tokens are prefilled. Tiers, least recently used blocks moving down: GPU memory (--prefix-cache-gpu), "
        "CPU RAM (--prefix-cache-ram), disk (--prefix-cache-disk, which also keeps them across restarts). "
        "Example: --prefix-cache-ram 16GiB --prefix-cache-disk 200GiB")
    g.add_argument("--prefix-cache-gpu", type=_size, default=0, metavar="SIZE",
                   help="GPU memory for cached blocks besides the KV cache, e.g. 8GiB: hits there need no copy "
                        "over the bus (default 0: none; ignored when the model runs on the CPU)")
    g.add_argument("--prefix-cache-ram", type=_size, default=DEFAULT_RAM, metavar="SIZE",
                   help=f"CPU memory for cached blocks, e.g. 4GiB, 512MiB; 0 turns the RAM tier off "
                        f"(default {DEFAULT_RAM})")
    g.add_argument("--prefix-cache-disk", type=_size, default=0, metavar="SIZE",
                   help="disk space for cached blocks, e.g. 50GiB: blocks are written there too and a later "
                        "process with the same --prefix-cache-dir starts with them (default 0: no disk tier)")
    g.add_argument("--prefix-cache-dir", type=Path, default=default_dir(), metavar="PATH",
                   help="folder of the disk tier; models may share it, their blocks never mix "
                        f"(default {default_dir()})")
    g.add_argument("--prefix-block", type=_positive, default=None, metavar="TOKENS",
                   help="tokens per cached block: a prompt reuses whole blocks only, so smaller blocks match "
                        "more, larger ones cost less bookkeeping (default: the KV cache's block, 16)")
