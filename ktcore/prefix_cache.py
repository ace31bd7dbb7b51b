"""The prefix cache: KV blocks of earlier prompts kept across requests and chat turns, in tiers.

A prompt is cut into blocks of ``block_size`` tokens. Each full block is named by a chained hash
(``block_hashes``): the hash of a block covers every token before it and the model's identity (the salt), so
equal names mean equal keys and values. The engine asks how many leading blocks of a new prompt are stored
(``PrefixStore.longest_prefix``), restores them (``get``) instead of computing them, and stores the blocks it
computed (``put``). A payload is one block's K/V for every layer: a tuple of tensors of any dtypes and shapes,
restored bit for bit.

Tiers, fastest first, each with a byte budget (0: no such tier):

- ``device``: memory of the device the model runs on (GPU). On a CPU-only model there is no separate device
  tier: RAM is the device's memory and is counted once.
- ``ram``: CPU memory, pinned when CUDA is available (copies back to the GPU run at full bus speed).
- ``disk``: a folder, one safetensors file per block (``ab/abcdef....safetensors``: the packed block as one
  uint8 tensor; the metadata holds the block's name, its tensors' dtypes, shapes and offsets, and a CRC-32). The folder is the index: a new process finds the files saved
  earlier, most recently used last by modification time, so a restart keeps its cache. Several models may
  share a folder (their salts differ); the budget covers the folder.

``device`` and ``ram`` hold an entry in one of them at a time: a new block goes to the first of them with a
budget that can hold it; a full tier moves its least recently used entries down to the next one (and the last
memory tier to disk, or drops them). The disk is written through: every block put is also written there in
the background, so it survives a restart; the disk budget is kept by deleting its least recently used files.
A hit in a lower tier promotes the entry to the top memory tier (the disk keeps its file). A file that is
truncated, corrupted or not ktcore's is a miss with a warning (and is deleted), never an error or wrong data.

All methods are thread-safe: the engine thread puts and gets while the server's ``/metrics`` route reads
``stats()``.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cli.prefix_options import DEFAULT_RAM, add_prefix_cache_args, default_dir  # noqa: F401 (re-exported)
from .engine.paged_cache import DEFAULT_BLOCK_SIZE as DEFAULT_BLOCK

log = logging.getLogger("ktcore.prefix_cache")

FILE_SUFFIX = ".safetensors"
FORMAT = "ktcore-prefix-1"  # metadata["format"] of a block file; a file without it is not ours
TIERS = ("device", "ram", "disk")
MAX_PENDING_BYTES = 256 << 20  # blocks waiting for the disk writer at most; more are not written through
WRITER_IDLE_S = 5.0  # the disk writer thread ends after this long without work (a new write starts another)


# ------------------------------------------------------------------------------------------------ hashing


def block_hashes(token_ids: Sequence[int], block_size: int, salt: bytes = b"") -> list[bytes]:
    """The names of the full blocks of ``token_ids``: ``h_i = sha256(h_{i-1} || tokens of block i)`` with
    ``h_{-1} = sha256(salt)``, tokens as little-endian int64. A last, partial block has no name."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, not {block_size}")
    data = np.asarray(token_ids, dtype="<i8").tobytes()
    step = block_size * 8
    h = hashlib.sha256(salt).digest()
    out = []
    for start in range(0, len(data) - step + 1, step):
        h = hashlib.sha256(h + data[start:start + step]).digest()
        out.append(h)
    return out


def model_salt(path: str | os.PathLike | None, *extra: object) -> bytes:
    """A salt naming a model: the weight file's resolved path, size and modification time (so a changed file
    is a different model), plus whatever else changes the keys and values (rule files, dtype, ...). A ``path``
    that names no file (``tiny:<family>``, a seeded test model) counts as its text."""
    parts: list[str] = []
    if path is not None and Path(path).is_file():
        p = Path(path).resolve()
        st = p.stat()
        parts += [str(p), str(st.st_size), str(st.st_mtime_ns)]
    elif path is not None:
        parts.append(str(path))
    parts += [repr(x) for x in extra]
    return hashlib.sha256("\0".join(parts).encode()).digest()


# ------------------------------------------------------------------------------------------------ payloads


ALIGN = 16  # bytes: a packed block's size is a multiple of it, so rows of stacked blocks view as any dtype


@dataclass(frozen=True)
class _Layout:
    """Where each tensor of a payload lies in its packed byte buffer: ``(dtype, shape, offset, nbytes)``; the
    buffer's ``nbytes`` is padded to ``ALIGN``."""

    specs: tuple[tuple[torch.dtype, tuple[int, ...], int, int], ...]
    nbytes: int

    @staticmethod
    def of(payload: Sequence[torch.Tensor]) -> _Layout:
        specs, offset = [], 0
        for t in payload:
            size = t.element_size()
            offset = -(-offset // size) * size  # a view of another dtype must start on its element size
            specs.append((t.dtype, tuple(t.shape), offset, t.numel() * size))
            offset += t.numel() * size
        return _Layout(tuple(specs), -(-offset // ALIGN) * ALIGN)

    def to_json(self) -> str:
        return json.dumps({"nbytes": self.nbytes, "tensors": [
            [str(dtype).removeprefix("torch."), list(shape), offset, n] for dtype, shape, offset, n in self.specs]})

    @staticmethod
    def from_json(text: str) -> _Layout:
        """The layout a block file's metadata describes, checked: every view it makes lies inside the buffer."""
        data = json.loads(text)
        nbytes, specs = int(data["nbytes"]), []
        for name, shape, offset, n in data["tensors"]:
            dtype = getattr(torch, name, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {name!r} in the block's layout")
            shape = tuple(int(d) for d in shape)
            if n != math.prod(shape) * dtype.itemsize or offset % dtype.itemsize or not 0 <= offset <= nbytes - n:
                raise ValueError(f"a {name} tensor of shape {list(shape)} at byte {offset} does not fit the block")
            specs.append((dtype, shape, int(offset), int(n)))
        if nbytes % ALIGN:
            raise ValueError(f"a block of {nbytes} bytes is not padded to {ALIGN}")
        return _Layout(tuple(specs), nbytes)

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The payload's tensors as views into ``flat``: ``[nbytes]`` gives each tensor, ``[k, nbytes]`` (k
        packed blocks) each tensor stacked, ``[k, *shape]``."""
        lead = tuple(flat.shape[:-1])
        return tuple(flat[..., offset:offset + n].view(dtype).view(lead + shape)
                     for dtype, shape, offset, n in self.specs)


@dataclass
class _Packed:
    """One payload as one flat uint8 buffer (one copy moves it between devices) and its layout."""

    flat: torch.Tensor
    layout: _Layout
    ready: torch.cuda.Event | None = None  # recorded after the copy that filled ``flat`` (CUDA only)

    @property
    def nbytes(self) -> int:
        return self.flat.numel()

    def to(self, device: torch.device, pin: bool = False) -> _Packed:
        """A copy on ``device`` (pinned host memory if ``pin`` and the device is the CPU)."""
        return _Packed(_copy(self.flat, device, pin, self.ready), self.layout, _record(device))

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()


def _record(device: torch.device) -> torch.cuda.Event | None:
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _copy(src: torch.Tensor, device: torch.device, pin: bool, ready: torch.cuda.Event | None = None) -> torch.Tensor:
    """A new tensor on ``device`` equal to ``src`` (pinned if ``pin`` and ``device`` is the CPU). A copy to the
    host is complete on return; one to an accelerator is ordered on its current stream."""
    if device.type == "cpu":
        out = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)
        if ready is not None:
            ready.synchronize()
        out.copy_(src)
        return out
    return src.to(device, non_blocking=src.is_pinned(), copy=True)


def _pack_many(payload: Sequence[torch.Tensor], device: torch.device, pin: bool,
               layout: _Layout | None = None) -> list[_Packed]:
    """``payload``'s tensors hold ``k`` blocks stacked on dim 0 (tensor j of block i: ``payload[j][i]``);
    one packed copy of each block on ``device``, never a view of the caller's tensors. The blocks are packed
    where they are (one ``cat``), then moved with one copy: a block of 27 layers' K and V is not 54 transfers."""
    k = payload[0].shape[0] if payload else 1
    layout = layout or _Layout.of([t[0] for t in payload])
    pin = pin and device.type == "cpu"
    rows = [t.detach().reshape(k, t.numel() // k).view(torch.uint8) for t in payload]
    devices = {r.device for r in rows}
    src = next(iter(devices)) if len(devices) == 1 else device
    ends = np.cumsum([0] + [r.shape[1] for r in rows])
    gapless = all(spec[2] == end for spec, end in zip(layout.specs, ends))
    pad = layout.nbytes - int(ends[-1])
    if gapless and len(devices) == 1:
        flat = torch.cat([*rows, torch.zeros(k, pad, dtype=torch.uint8, device=src)], dim=1) if pad else \
            torch.cat(rows, dim=1)
    else:
        flat = torch.zeros(k, layout.nbytes, dtype=torch.uint8, device=src)
        for r, (*_, offset, n) in zip(rows, layout.specs):
            flat[:, offset:offset + n].copy_(r)
    if flat.device == device and (flat.is_pinned() or not pin):
        return [_Packed(flat[0] if k == 1 else row.clone(), layout, _record(device)) for row in flat]
    # each block its own buffer (evicting one frees its bytes), filled by one copy straight from the device
    ready = _record(src)
    return [_Packed(_copy(row, device, pin, ready), layout, _record(device)) for row in flat]


def _pack(payload: Sequence[torch.Tensor], device: torch.device, pin: bool) -> _Packed:
    return _pack_many([t.unsqueeze(0) for t in payload], device, pin)[0]


def _checksum(flat: torch.Tensor) -> str:
    """CRC-32 of a packed block's bytes: catches a damaged file (safetensors itself checks only sizes)."""
    return f"{zlib.crc32(flat.numpy()):08x}"


# ------------------------------------------------------------------------------------------------ tiers


@dataclass
class _Counts:
    hits: int = 0
    misses: int = 0
    demotions: int = 0  # entries moved from this tier to the next one
    evictions: int = 0  # entries dropped from the store from this tier


@dataclass
class _MemoryTier:
    name: str
    device: torch.device
    budget: int
    pin: bool = False
    entries: OrderedDict[bytes, _Packed] = field(default_factory=OrderedDict)  # least recently used first
    used: int = 0
    counts: _Counts = field(default_factory=_Counts)


class _DiskTier:
    """One safetensors file per block under ``root``; ``entries`` (name -> file bytes, least recently used
    first) is rebuilt from the folder at start."""

    def __init__(self, root: Path, budget: int):
        self.root = root
        self.budget = budget
        self.entries: OrderedDict[bytes, int] = OrderedDict()
        self.used = 0
        self.counts = _Counts()
        self.errors = 0  # files that could not be read or written
        self.skipped = 0  # blocks not written because too many were waiting for the disk
        root.mkdir(parents=True, exist_ok=True)
        found = []
        for sub in root.iterdir():
            if not (sub.is_dir() and len(sub.name) == 2):
                continue
            for f in sub.iterdir():
                name = f.name.removesuffix(FILE_SUFFIX)
                if f.name.endswith(".tmp"):
                    f.unlink(missing_ok=True)  # a write that a crash interrupted
                elif f.name.endswith(FILE_SUFFIX) and len(name) == 64 and name.startswith(sub.name):
                    try:
                        st = f.stat()
                        found.append((st.st_mtime_ns, bytes.fromhex(name), st.st_size))
                    except (OSError, ValueError):
                        continue
        for _, h, size in sorted(found):
            self.entries[h] = size
            self.used += size
        self.last_ns = max((t for t, _, _ in found), default=0)

    def path(self, h: bytes) -> Path:
        name = h.hex()
        return self.root / name[:2] / f"{name}{FILE_SUFFIX}"

    def stamp(self, h: bytes) -> None:
        """Mark the file as used now: the next process orders its LRU by modification time (made strictly
        increasing here, as files written within one clock tick would otherwise tie)."""
        self.last_ns = max(time.time_ns(), self.last_ns + 1)
        try:
            os.utime(self.path(h), ns=(self.last_ns, self.last_ns))
        except OSError:
            pass

    def delete(self, h: bytes) -> None:
        self.used -= self.entries.pop(h, 0)
        self.path(h).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ the store


class PrefixStore:
    """Blocks of K/V by name, in the tiers device -> CPU RAM -> disk (module docstring).

    ``device_bytes``: budget on ``device`` (ignored when it is the CPU: RAM is then the device's memory);
    ``ram_bytes``: CPU memory; ``disk_dir``/``disk_bytes``: the folder and its budget (0 or no folder: no
    disk tier). ``block_size`` and ``salt`` are what ``hashes()`` names a prompt's blocks with.
    """

    def __init__(self, *, device_bytes: int = 0, ram_bytes: int = 4 << 30, disk_dir: str | Path | None = None,
                 disk_bytes: int = 0, device: torch.device | str = "cpu", block_size: int = DEFAULT_BLOCK,
                 salt: bytes = b""):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.block_size = block_size
        self.salt = salt
        self._lock = threading.RLock()
        self._tiers: list[_MemoryTier] = []
        if self.device.type != "cpu" and device_bytes > 0:
            self._tiers.append(_MemoryTier("device", self.device, int(device_bytes)))
        if ram_bytes > 0:
            self._tiers.append(_MemoryTier("ram", torch.device("cpu"), int(ram_bytes),
                                           pin=torch.cuda.is_available()))
        self._disk = _DiskTier(Path(disk_dir).expanduser(), int(disk_bytes)) if disk_dir and disk_bytes > 0 else None
        self._pending: dict[bytes, _Packed] = {}  # written to disk by the writer thread, not yet there
        self._pending_bytes = 0
        self._writes: queue.Queue[tuple[bytes, _Packed] | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._puts = self._rejected = self._requests = self._prompt_tokens = self._hit_tokens = 0
        if self._disk is not None:
            with self._lock:
                self._trim_disk(0)  # the budget may be smaller than what an earlier process left

    # ------------------------------------------------------------------ options

    @classmethod
    def from_options(cls, args: argparse.Namespace, device: torch.device | str, salt: bytes) -> PrefixStore:
        """The store ``add_prefix_cache_args``'s options describe, for a model whose KV cache is on ``device``."""
        return cls(device_bytes=args.prefix_cache_gpu, ram_bytes=args.prefix_cache_ram,
                   disk_dir=args.prefix_cache_dir, disk_bytes=args.prefix_cache_disk, device=device,
                   block_size=args.prefix_block or DEFAULT_BLOCK, salt=salt)

    @property
    def enabled(self) -> bool:
        return bool(self._tiers or self._disk)

    def hashes(self, token_ids: Sequence[int]) -> list[bytes]:
        """``block_hashes`` with this store's block size and salt."""
        return block_hashes(token_ids, self.block_size, self.salt)

    # ------------------------------------------------------------------ put

    def put(self, h: bytes, payload: tuple[torch.Tensor, ...]) -> None:
        """Store ``payload`` (one block's K/V for every layer) under the name ``h``. A name already stored is
        only marked as recently used (equal names hold equal values)."""
        self.put_many([h], [t.unsqueeze(0) for t in payload])

    def put_many(self, hashes: Sequence[bytes], payload: Sequence[torch.Tensor]) -> None:
        """``put`` of ``len(hashes)`` blocks at once: ``payload``'s tensors hold them stacked on dim 0 (tensor j
        of block i is ``payload[j][i]``); packed with one copy off the device for all of them."""
        if not hashes:
            return
        layout = _Layout.of([t[0] for t in payload])
        with self._lock:
            self._puts += len(hashes)
            new, seen = [], set()
            for i, h in enumerate(hashes):
                held = next((t for t in self._tiers if h in t.entries), None)
                if held is not None:
                    held.entries.move_to_end(h)
                elif h not in seen:
                    new.append(i)
                    seen.add(h)
            target = next((i for i, t in enumerate(self._tiers) if t.budget >= layout.nbytes), None)
            disk_fits = self._disk is not None and self._disk.budget >= layout.nbytes
            if target is None and not disk_fits:
                self._rejected += len(new)
                return
        if not new:
            return
        if len(new) < len(hashes):
            index = torch.tensor(new, device=payload[0].device) if payload else None
            payload = [t.index_select(0, index) for t in payload]
        tier = self._tiers[target] if target is not None else None
        packed = _pack_many(payload, tier.device if tier else torch.device("cpu"), tier.pin if tier else False,
                            layout)
        with self._lock:
            for i, p in zip(new, packed):
                h = hashes[i]
                if tier is not None and not any(h in t.entries for t in self._tiers):
                    self._insert(target, h, p)
                if disk_fits and h not in self._disk.entries and h not in self._pending:
                    self._write_later(h, p)

    def _insert(self, i: int, h: bytes, packed: _Packed) -> None:
        tier = self._tiers[i]
        while tier.entries and tier.used + packed.nbytes > tier.budget:
            victim, old = tier.entries.popitem(last=False)
            tier.used -= old.nbytes
            self._demote(i, victim, old)
        tier.entries[h] = packed
        tier.used += packed.nbytes

    def _demote(self, i: int, h: bytes, packed: _Packed) -> None:
        counts = self._tiers[i].counts
        if i + 1 < len(self._tiers) and self._tiers[i + 1].budget >= packed.nbytes:
            nxt = self._tiers[i + 1]
            self._insert(i + 1, h, packed.to(nxt.device, nxt.pin))
            counts.demotions += 1
        elif self._disk is not None and (h in self._disk.entries or h in self._pending):
            counts.demotions += 1  # written through already
        elif self._disk is not None and self._disk.budget >= packed.nbytes and self._write_later(h, packed):
            counts.demotions += 1
        else:
            counts.evictions += 1

    # ------------------------------------------------------------------ disk writes (background thread)

    def _write_later(self, h: bytes, packed: _Packed) -> bool:
        """Queue ``packed`` for the disk; ``False`` (not queued) when ``MAX_PENDING_BYTES`` wait already: a
        slow disk must not hold memory beyond the budgets or stall the engine."""
        if self._pending_bytes + packed.nbytes > MAX_PENDING_BYTES:
            self._disk.skipped += 1
            return False
        self._pending[h] = packed
        self._pending_bytes += packed.nbytes
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="ktcore-prefix-writer", daemon=True)
            self._writer.start()
            _OPEN.add(self)
        self._writes.put((h, packed))
        return True

    def _write_loop(self) -> None:
        while True:
            try:
                job = self._writes.get(timeout=WRITER_IDLE_S)
            except queue.Empty:
                with self._lock:  # _write_later starts a new writer under the same lock
                    if self._writes.empty():
                        if self._writer is threading.current_thread():
                            self._writer = None
                            _OPEN.discard(self)
                        return
                continue
            if job is None:
                break
            h, packed = job
            try:
                self._write(h, packed)
            except Exception as exc:  # noqa: BLE001 - a full or read-only disk must not stop the engine
                log.warning("prefix cache: cannot write %s: %s", self._disk.path(h), exc)
                with self._lock:
                    self._disk.errors += 1
            finally:
                with self._lock:
                    if self._pending.pop(h, None) is not None:
                        self._pending_bytes -= packed.nbytes
                self._writes.task_done()
        self._writes.task_done()

    def _write(self, h: bytes, packed: _Packed) -> None:
        from safetensors.torch import save

        cpu = packed if packed.flat.device.type == "cpu" else packed.to(torch.device("cpu"))
        cpu.wait()
        data = save({"block": cpu.flat}, metadata={"format": FORMAT, "name": h.hex(), "checksum": _checksum(cpu.flat),
                                                   "layout": cpu.layout.to_json()})
        disk = self._disk
        with self._lock:
            if h in disk.entries or len(data) > disk.budget:
                return
            self._trim_disk(len(data))
            disk.entries[h] = len(data)  # reserved before writing: the budget is never exceeded
            disk.used += len(data)
        path = disk.path(h)
        try:
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            with self._lock:
                disk.stamp(h)
        except BaseException:
            with self._lock:
                disk.delete(h)
            raise

    def _trim_disk(self, room: int) -> None:
        disk = self._disk
        while disk.entries and disk.used + room > disk.budget:
            victim = next(iter(disk.entries))
            disk.delete(victim)
            disk.counts.evictions += 1

    def flush(self) -> None:
        """Wait until every block queued for the disk is written."""
        self._writes.join()

    def close(self) -> None:
        """Write what is queued for the disk and stop the writer thread (done at interpreter exit too)."""
        with self._lock:
            _OPEN.discard(self)
            writer, self._writer = self._writer, None
            if writer is not None:
                self._writes.put(None)
        if writer is not None:
            writer.join()

    # ------------------------------------------------------------------ get

    def get(self, h: bytes, device: torch.device | str) -> tuple[torch.Tensor, ...] | None:
        """A copy of the payload stored under ``h`` on ``device``, bit for bit, or ``None``. A hit below the top
        memory tier promotes the entry to it."""
        found = self._lookup(h)
        if found is None:
            return None
        packed = self._promote(h, *found)
        return packed.layout.views(packed.to(torch.device(device)).flat)

    def get_many(self, hashes: Sequence[bytes], device: torch.device | str) -> tuple[torch.Tensor, ...] | None:
        """``get`` of the leading ``hashes`` that are stored, stacked: tensor j of the result is ``[k, *shape_j]``
        with block i's tensor j at index i, ``k`` the number of leading blocks restored (``None``: not even the
        first). Blocks in one tier reach ``device`` with one copy."""
        device = torch.device(device)
        packs: list[_Packed] = []
        for h in hashes:
            found = self._lookup(h)
            if found is None:
                break
            packed = self._promote(h, *found)
            if packs and packed.layout != packs[0].layout:
                break
            packs.append(packed)
        if not packs:
            return None
        layout = packs[0].layout
        stacked = torch.empty((len(packs), layout.nbytes), dtype=torch.uint8, device=device)
        if all(p.flat.device == device for p in packs):
            torch.stack([p.flat for p in packs], out=stacked)
        else:  # one transfer per block, straight from pinned memory: no staging copy on the host
            for row, p in zip(stacked, packs):
                p.wait()
                row.copy_(p.flat, non_blocking=p.flat.is_pinned())
        return layout.views(stacked)

    def _lookup(self, h: bytes) -> tuple[int, _Packed] | None:
        """Where ``h`` is (tier index; ``len(tiers)``: the disk) and its packed payload, counting hits and misses
        per tier; a disk hit is read here."""
        with self._lock:
            for i, tier in enumerate(self._tiers):
                if h in tier.entries:
                    tier.counts.hits += 1
                    tier.entries.move_to_end(h)
                    if self._disk is not None and h in self._disk.entries:
                        self._disk.entries.move_to_end(h)  # a block in use is the last the disk should drop
                    return i, tier.entries[h]
                tier.counts.misses += 1
            if h in self._pending:
                self._disk.counts.hits += 1
                return len(self._tiers), self._pending[h]  # on its way to the disk: as good as read from it
            if self._disk is None or h not in self._disk.entries:
                if self._disk is not None:
                    self._disk.counts.misses += 1
                return None
        packed = self._read(h)
        return None if packed is None else (len(self._tiers), packed)

    def _promote(self, h: bytes, i: int, packed: _Packed) -> _Packed:
        """Move an entry found in tier ``i`` to the top memory tier (the disk keeps its file)."""
        if i == 0 or not self._tiers or self._tiers[0].budget < packed.nbytes:
            return packed
        top = self._tiers[0]
        if not (packed.flat.device == top.device and (packed.flat.is_pinned() or not top.pin)):
            packed = packed.to(top.device, top.pin)
        with self._lock:
            for tier in self._tiers[1:]:  # memory tiers hold an entry once
                if h in tier.entries:
                    tier.used -= tier.entries.pop(h).nbytes
            if h not in top.entries:
                self._insert(0, h, packed)
        return packed

    def _read(self, h: bytes) -> _Packed | None:
        from safetensors import safe_open

        path = self._disk.path(h)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or meta.get("name") != h.hex() or list(f.keys()) != ["block"]:
                    raise ValueError(f"not a ktcore prefix block of this name (format {meta.get('format')!r}, "
                                     f"name {meta.get('name')!r}, tensors {list(f.keys())})")
                layout = _Layout.from_json(meta["layout"])
                flat = f.get_tensor("block")
            if flat.dtype != torch.uint8 or flat.shape != (layout.nbytes,):
                raise ValueError(f"the block holds {flat.dtype} {list(flat.shape)}, its layout {layout.nbytes} bytes")
            if _checksum(flat) != meta.get("checksum"):
                raise ValueError("checksum mismatch: the file is corrupted")
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file is a miss, never wrong data
            missing = isinstance(exc, FileNotFoundError)  # another process sharing the folder deleted it
            if not missing:
                log.warning("prefix cache: dropping unreadable block file %s: %s", path, exc)
            with self._lock:
                self._disk.counts.misses += 1
                if not missing:
                    self._disk.errors += 1
                self._disk.delete(h)
            return None
        with self._lock:
            self._disk.counts.hits += 1
            if h in self._disk.entries:
                self._disk.entries.move_to_end(h)
                self._disk.stamp(h)
        return _Packed(flat, layout)

    # ------------------------------------------------------------------ lookups and counts

    def longest_prefix(self, hashes: Sequence[bytes]) -> int:
        """How many of the leading ``hashes`` are stored (in any tier); nothing is promoted or touched."""
        with self._lock:
            n = 0
            for h in hashes:
                if not (any(h in t.entries for t in self._tiers) or h in self._pending
                        or (self._disk is not None and h in self._disk.entries)):
                    break
                n += 1
            return n

    def __contains__(self, h: bytes) -> bool:
        return self.longest_prefix([h]) == 1

    def record_request(self, prompt_tokens: int, hit_tokens: int) -> None:
        """Count one request's prompt tokens and how many of them were restored from the cache, and log it."""
        with self._lock:
            self._requests += 1
            self._prompt_tokens += prompt_tokens
            self._hit_tokens += hit_tokens
        log.info("prefix cache: %d of %d prompt tokens restored (%.0f%%)", hit_tokens, prompt_tokens,
                 100.0 * hit_tokens / prompt_tokens if prompt_tokens else 0.0)

    def summary(self) -> str:
        """The tiers and their budgets in one line, e.g. ``ram 4.0 GiB, disk 50.0 GiB at /path`` (``off``: none)."""
        stats = self.stats()["tiers"]
        parts = [f"{name} {info['budget_bytes'] / (1 << 30):.1f} GiB" for name, info in stats.items()]
        if self._disk is not None:
            parts[-1] += f" at {self._disk.root}"
        return ", ".join(parts) or "off"

    def stats(self) -> dict:
        """Counts per tier (``tiers[name]``: hits, misses, entries, bytes, budget_bytes, demotions,
        evictions; the disk also ``errors``: unreadable or unwritable files) and totals."""
        with self._lock:
            tiers = {}
            for t in self._tiers:
                tiers[t.name] = dict(vars(t.counts), entries=len(t.entries), bytes=t.used, budget_bytes=t.budget)
            if self._disk is not None:
                d = self._disk
                tiers["disk"] = dict(vars(d.counts), entries=len(d.entries), bytes=d.used, budget_bytes=d.budget,
                                     errors=d.errors, skipped=d.skipped, pending_writes=len(self._pending))
            hits = sum(t["hits"] for t in tiers.values())
            last = list(tiers.values())[-1]["misses"] if tiers else 0
            return {"tiers": tiers, "hits": hits, "misses": last, "puts": self._puts, "rejected": self._rejected,
                    "requests": self._requests, "prompt_tokens": self._prompt_tokens,
                    "hit_tokens": self._hit_tokens}

    def prometheus_text(self) -> str:
        """``stats()`` in Prometheus' text format."""
        return render_metrics(lambda: metric_families(self)).decode()


_OPEN: weakref.WeakSet[PrefixStore] = weakref.WeakSet()  # stores with a writer thread


@atexit.register
def _close_all() -> None:
    for store in list(_OPEN):
        store.close()


# ------------------------------------------------------------------------------------------------ metrics


class _Collector:
    def __init__(self, families: Callable[[], Iterable]):
        self.collect = families


def render_metrics(families: Callable[[], Iterable]) -> bytes:
    """Prometheus' text format of the metric families ``families()`` yields (read at each call)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(families))
    return generate_latest(registry)


def metric_families(store: PrefixStore) -> Iterator:
    """Prometheus metric families of ``store.stats()`` (prometheus_client's ``Metric`` objects)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    s = store.stats()
    per_tier = (
        ("hits", CounterMetricFamily, "lookups that found the block in this tier"),
        ("misses", CounterMetricFamily, "lookups that reached this tier and did not find the block there"),
        ("demotions", CounterMetricFamily, "blocks moved from this tier to the next one"),
        ("evictions", CounterMetricFamily, "blocks dropped from the cache from this tier"),
        ("entries", GaugeMetricFamily, "blocks held in this tier"),
        ("bytes", GaugeMetricFamily, "bytes held in this tier"),
        ("budget_bytes", GaugeMetricFamily, "byte budget of this tier"),
    )
    for key, kind, doc in per_tier:
        family = kind(f"ktcore_prefix_cache_{key}", doc, labels=["tier"])
        for name, tier in s["tiers"].items():
            family.add_metric([name], tier[key])
        yield family
    totals = (
        ("disk_errors", "block files that could not be read or written",
         s["tiers"].get("disk", {}).get("errors", 0)),
        ("requests", "requests whose prompt was looked up", s["requests"]),
        ("prompt_tokens", "prompt tokens of those requests", s["prompt_tokens"]),
        ("hit_tokens", "prompt tokens restored from the cache instead of computed", s["hit_tokens"]),
        ("puts", "blocks offered to the cache", s["puts"]),
        ("rejected", "blocks larger than every tier's budget, not stored", s["rejected"]),
    )
    for key, doc, value in totals:
        yield CounterMetricFamily(f"ktcore_prefix_cache_{key}", doc, value=value)
