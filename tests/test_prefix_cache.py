"""The tiered prefix store (ktcore/prefix_cache.py): block names, bit-exact restore from every tier, LRU
demotion under byte budgets, disk persistence and damaged files, threads, metrics and options."""

from __future__ import annotations

import argparse
import json
import logging
import random
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ktcore.prefix_cache import (
    PrefixStore,
    add_prefix_cache_args,
    block_hashes,
    model_salt,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for the device tier")


def _payload(seed: int, layers: int = 2) -> tuple[torch.Tensor, ...]:
    """One block's K/V as the engine might hand it over: several dtypes, with NaN and -0.0 bit patterns that a
    float comparison would not see, and an int8 tensor of odd length (the next fp32 tensor needs padding)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        k = torch.randn(2, 4, 8, generator=g)
        k[0, 0, :2] = torch.tensor([float("nan"), -0.0])
        out += [k, torch.randn(2, 4, 8, generator=g).to(torch.bfloat16)]
    out.append(torch.randint(-128, 128, (7,), generator=g, dtype=torch.int8))
    out.append(torch.randn(3, 5, generator=g).t())  # not contiguous
    return tuple(out)


def _nbytes(payload) -> int:
    raw = sum(t.numel() * t.element_size() for t in payload) + 1  # + the int8 tensor's padding
    return -(-raw // 16) * 16  # packed blocks are padded to 16 bytes


def _same(a, b) -> bool:
    """Bit for bit (NaN payloads and signed zeros included), same dtypes and shapes."""
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape
        and torch.equal(x.cpu().contiguous().view(-1).view(torch.uint8), y.cpu().contiguous().view(-1).view(torch.uint8))
        for x, y in zip(a, b))


BLOCK = _nbytes(_payload(0))


@pytest.fixture(scope="module")
def file_bytes(tmp_path_factory) -> int:
    """The size of one block's file (safetensors header included)."""
    folder = tmp_path_factory.mktemp("one")
    store = PrefixStore(ram_bytes=0, disk_dir=folder, disk_bytes=100 * BLOCK)
    store.put(_names(1)[0], _payload(0))
    store.flush()
    (f,) = folder.rglob("*.safetensors")
    assert BLOCK < f.stat().st_size < BLOCK + 1000
    return f.stat().st_size


def _names(n: int, salt: bytes = b"t") -> list[bytes]:
    return block_hashes(list(range(n * 4)), 4, salt)


def _tiers(store) -> dict:
    return store.stats()["tiers"]


def _holds(store, tier: str, names) -> set[int]:
    """Indices of ``names`` held in ``tier``."""
    inner = {"ram": next((t for t in store._tiers if t.name == "ram"), None),
             "device": next((t for t in store._tiers if t.name == "device"), None)}
    entries = store._disk.entries if tier == "disk" else inner[tier].entries
    return {i for i, h in enumerate(names) if h in entries}


# ------------------------------------------------------------------------------------------------ hashing


def test_block_hashes_chain_prefixes_and_salt():
    ids = list(range(100, 150))
    hs = block_hashes(ids, 16)
    assert len(hs) == 3 and len(set(hs)) == 3 and all(len(h) == 32 for h in hs)  # 50 tokens: the last 2 unnamed
    assert block_hashes(ids[:48], 16) == hs == block_hashes(ids + [7, 8, 9], 16)[:3]
    assert block_hashes(ids[:47], 16) == hs[:2]
    assert block_hashes(ids, 16, salt=b"other model") != hs
    assert set(block_hashes(ids, 16, salt=b"other model")).isdisjoint(hs)
    changed = list(ids)
    changed[20] += 1  # inside block 1: block 0 keeps its name, every later block changes
    hc = block_hashes(changed, 16)
    assert hc[0] == hs[0] and hc[1] != hs[1] and hc[2] != hs[2]
    assert block_hashes(list(range(16, 32)), 16) != hs[1:2]  # a block's name depends on what came before
    with pytest.raises(ValueError, match="block_size"):
        block_hashes(ids, 0)


def test_model_salt_names_the_file_and_settings(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x" * 10)
    a = model_salt(f, "rules.yaml", torch.bfloat16)
    assert a == model_salt(f, "rules.yaml", torch.bfloat16)
    assert a != model_salt(f, "rules.yaml", torch.float32)
    f.write_bytes(b"y" * 11)
    assert a != model_salt(f, "rules.yaml", torch.bfloat16)


# ------------------------------------------------------------------------------------------------ tiers


def test_ram_tier_restores_bit_exact_and_copies():
    store = PrefixStore(ram_bytes=10 * BLOCK)
    p = _payload(1)
    h = _names(1)[0]
    store.put(h, p)
    got = store.get(h, "cpu")
    assert _same(got, p)
    got[0].fill_(0)  # the caller's copy: the stored block does not change
    assert _same(store.get(h, "cpu"), p)
    assert store.get(_names(2)[1], "cpu") is None
    t = _tiers(store)["ram"]
    assert (t["hits"], t["misses"], t["entries"]) == (2, 1, 1)
    assert "device" not in _tiers(store)  # CPU model: RAM is the device's memory, one tier


def test_cpu_model_counts_ram_once():
    store = PrefixStore(device_bytes=10 * BLOCK, ram_bytes=10 * BLOCK, device="cpu")
    store.put(_names(1)[0], _payload(1))
    assert list(_tiers(store)) == ["ram"] and _tiers(store)["ram"]["bytes"] == BLOCK


def test_disk_tier_restores_bit_exact(tmp_path):
    store = PrefixStore(ram_bytes=0, disk_dir=tmp_path, disk_bytes=100 * BLOCK)
    names = _names(3)
    for i, h in enumerate(names):
        store.put(h, _payload(i))
    store.flush()
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3
    for i, h in enumerate(names):
        assert _same(store.get(h, "cpu"), _payload(i))
    assert _tiers(store)["disk"]["hits"] == 3


def test_lru_demotes_ram_to_disk_then_drops(tmp_path, file_bytes):
    store = PrefixStore(ram_bytes=2 * BLOCK, disk_dir=tmp_path, disk_bytes=3 * file_bytes + 100)
    names = _names(6)
    store.put(names[0], _payload(0))
    store.put(names[1], _payload(1))
    assert store.get(names[0], "cpu") is not None  # 0 is now the most recently used
    store.put(names[2], _payload(2))  # RAM holds two: 1, the least recently used, leaves it
    store.flush()
    assert _holds(store, "ram", names) == {0, 2}
    assert _holds(store, "disk", names) == {0, 1, 2}  # written through
    assert _tiers(store)["ram"]["demotions"] == 1
    for i in (3, 4, 5):
        store.put(names[i], _payload(i))
        store.flush()
    assert _holds(store, "ram", names) == {4, 5}
    assert _holds(store, "disk", names) == {3, 4, 5}  # three files fit: the oldest are deleted
    assert _tiers(store)["disk"]["evictions"] == 3
    assert store.get(names[1], "cpu") is None
    assert _same(store.get(names[3], "cpu"), _payload(3))  # from disk, promoted to RAM
    assert _holds(store, "ram", names) == {5, 3}
    assert store.longest_prefix(names) == 0 and store.longest_prefix(names[3:]) == 3


def _stacked(payloads):
    return [torch.stack(ts) for ts in zip(*payloads)]


def test_put_many_and_get_many_match_single_blocks(tmp_path):
    """Blocks put stacked come back one by one and stacked; get_many stops at the first block not stored, and
    gathers blocks from RAM and disk alike."""
    store = PrefixStore(ram_bytes=3 * BLOCK, disk_dir=tmp_path, disk_bytes=100 * BLOCK)
    names = _names(6)
    payloads = [_payload(i) for i in range(6)]
    store.put(names[1], payloads[1])
    store.put_many(names[:5], _stacked(payloads[:5]))  # 1 is stored already: only marked as used
    store.flush()
    assert store.stats()["puts"] == 6 and _tiers(store)["disk"]["entries"] == 5
    assert _holds(store, "ram", names) == {2, 3, 4}  # 0 and 1 went down to the disk
    assert _same(store.get(names[3], "cpu"), payloads[3])
    got = store.get_many(names, "cpu")  # 5 was never stored
    assert _same(got, _stacked(payloads[:5]))
    assert store.get_many(names[5:], "cpu") is None
    t = _tiers(store)  # RAM holds 3: each block read from disk pushes an older one down
    assert (t["ram"]["hits"], t["disk"]["hits"], t["disk"]["misses"]) == (1, 5, 2)
    assert _holds(store, "ram", names) == {2, 3, 4}


def test_put_many_takes_strided_views_of_a_paged_pool():
    """What a paged KV cache hands over: [heads, block, dim] slices of one big [1, heads, positions, dim] pool."""
    pool = torch.randn(1, 3, 64, 8)
    store = PrefixStore(ram_bytes=1 << 20)
    names = _names(4)
    blocks = [(pool[0, :, 16 * b:16 * b + 16], pool[0, :, 16 * b:16 * b + 16].to(torch.bfloat16)) for b in range(4)]
    store.put(names[0], blocks[0])
    store.put_many(names[1:], [pool[0].unflatten(1, (4, 16)).transpose(0, 1)[1:],
                               pool[0].unflatten(1, (4, 16)).transpose(0, 1)[1:].to(torch.bfloat16)])
    expected = [tuple(t.clone() for t in b) for b in blocks]
    pool.zero_()  # the store holds copies
    assert all(_same(store.get(h, "cpu"), b) for h, b in zip(names, expected))
    got = store.get_many(names, "cpu")
    assert got[0].shape == (4, 3, 16, 8) and _same(got, _stacked(expected))


def test_ram_only_drops_least_recently_used():
    store = PrefixStore(ram_bytes=3 * BLOCK)
    names = _names(5)
    for i in range(3):
        store.put(names[i], _payload(i))
    store.get(names[0], "cpu")
    store.put(names[1], _payload(1))  # already stored: only marked as used
    store.put(names[3], _payload(3))
    store.put(names[4], _payload(4))
    assert _holds(store, "ram", names) == {1, 3, 4}
    assert _tiers(store)["ram"]["evictions"] == 2 and store.stats()["puts"] == 6


def test_payload_larger_than_every_budget_is_not_stored(tmp_path):
    store = PrefixStore(ram_bytes=BLOCK - 1, disk_dir=tmp_path, disk_bytes=BLOCK // 2)
    store.put(_names(1)[0], _payload(0))
    store.flush()
    assert store.stats()["rejected"] == 1 and store.longest_prefix(_names(1)) == 0
    assert not list(tmp_path.rglob("*.safetensors"))


def test_budgets_are_never_exceeded(tmp_path):
    rng = random.Random(0)
    store = PrefixStore(ram_bytes=5 * BLOCK, disk_dir=tmp_path, disk_bytes=9 * BLOCK)
    names = _names(30)
    sizes = {}
    for step in range(150):
        i = rng.randrange(30)
        if rng.random() < 0.6:
            p = _payload(i, layers=1 + i % 3)
            sizes[i] = p
            store.put(names[i], p)
        else:
            got = store.get(names[i], "cpu")
            assert got is None or _same(got, sizes[i])
        if step % 10 == 0:
            store.flush()
        for name, t in _tiers(store).items():
            assert t["bytes"] <= t["budget_bytes"], (step, name, t)
        ram = store._tiers[0]
        assert ram.used == sum(p.nbytes for p in ram.entries.values())
    store.flush()
    on_disk = sum(f.stat().st_size for f in tmp_path.rglob("*.safetensors"))
    assert on_disk == _tiers(store)["disk"]["bytes"] <= 9 * BLOCK


def test_disk_cache_survives_a_restart_in_lru_order(tmp_path, file_bytes):
    names = _names(4)
    first = PrefixStore(ram_bytes=BLOCK, disk_dir=tmp_path, disk_bytes=100 * BLOCK)
    for i, h in enumerate(names):
        first.put(h, _payload(i))
    first.flush()
    first.get(names[0], "cpu")  # from disk: 0 becomes the most recently used file
    first.close()

    second = PrefixStore(ram_bytes=BLOCK, disk_dir=tmp_path, disk_bytes=100 * BLOCK)
    assert second.longest_prefix(names) == 4 and _tiers(second)["disk"]["bytes"] == 4 * file_bytes
    smaller = PrefixStore(ram_bytes=0, disk_dir=tmp_path, disk_bytes=2 * file_bytes)  # the oldest files go
    assert _holds(smaller, "disk", names) == {0, 3}
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2
    assert _same(second.get(names[0], "cpu"), _payload(0)) and _same(second.get(names[3], "cpu"), _payload(3))
    assert second.get(names[1], "cpu") is None  # deleted by the other process: a miss, quietly
    other_model = PrefixStore(ram_bytes=0, disk_dir=tmp_path, disk_bytes=2 * file_bytes, block_size=4, salt=b"u")
    assert other_model.longest_prefix(other_model.hashes(list(range(16)))) == 0  # same tokens, other model
    same_model = PrefixStore(ram_bytes=0, disk_dir=tmp_path, disk_bytes=2 * file_bytes, block_size=4, salt=b"t")
    assert same_model.longest_prefix(same_model.hashes(list(range(16)))) == 1  # names[0] is there


def test_damaged_files_are_misses_with_a_warning(tmp_path, caplog):
    names = _names(4)
    store = PrefixStore(ram_bytes=0, disk_dir=tmp_path, disk_bytes=100 * BLOCK)
    for i, h in enumerate(names):
        store.put(h, _payload(i))
    store.flush()
    paths = [store._disk.path(h) for h in names]
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit of the last tensor flipped
    paths[1].write_bytes(paths[1].read_bytes()[: len(data) // 2])  # truncated
    paths[2].write_bytes(b"\xff" * 40)  # not safetensors at all
    names = names + _names(6)[4:]
    paths += [store._disk.path(h) for h in names[4:]]
    for p in paths[4:]:
        p.parent.mkdir(exist_ok=True)
    paths[4].write_bytes(paths[3].read_bytes())  # another block's file under this name
    meta = safe_open(paths[3], "pt").metadata()  # a valid file whose layout reaches past its block:
    save_file({"block": torch.zeros(16, dtype=torch.uint8)}, paths[5], metadata={
        **meta, "name": names[5].hex(), "layout": json.dumps({"nbytes": 16, "tensors": [["float32", [8], 0, 32]]})})
    store = PrefixStore(ram_bytes=0, disk_dir=tmp_path, disk_bytes=100 * BLOCK)  # a restart finds them all
    damaged = [0, 1, 2, 4, 5]
    fresh = PrefixStore(ram_bytes=0, disk_dir=tmp_path, disk_bytes=100 * BLOCK)
    with caplog.at_level(logging.WARNING, logger="ktcore.prefix_cache"):
        for s in (store, fresh):  # the second store finds them deleted: quiet misses
            assert all(s.get(names[i], "cpu") is None for i in damaged)
    assert _same(store.get(names[3], "cpu"), _payload(3))
    assert len([r for r in caplog.records if "unreadable block file" in r.getMessage()]) == 5
    assert _tiers(store)["disk"]["errors"] == 5 and not any(paths[i].exists() for i in damaged)
    store.put(names[0], _payload(0))  # and the name can be stored again
    store.flush()
    assert _same(store.get(names[0], "cpu"), _payload(0))


def test_threads_put_and_get_concurrently(tmp_path):
    store = PrefixStore(ram_bytes=6 * BLOCK, disk_dir=tmp_path, disk_bytes=10 * BLOCK)
    names = _names(24)
    payloads = [_payload(i) for i in range(24)]
    errors = []

    def work(seed):
        rng = random.Random(seed)
        try:
            for _ in range(120):
                i = rng.randrange(24)
                if rng.random() < 0.5:
                    store.put(names[i], payloads[i])
                else:
                    got = store.get(names[i], "cpu")
                    if got is not None and not _same(got, payloads[i]):
                        errors.append(i)
                store.longest_prefix(names[:i])
                store.stats()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.flush()
    assert errors == []
    for t in _tiers(store).values():
        assert t["bytes"] <= t["budget_bytes"]
    assert sum(f.stat().st_size for f in tmp_path.rglob("*.safetensors")) == _tiers(store)["disk"]["bytes"]


@CUDA
def test_device_tier_demotes_to_ram_then_disk_then_drops(tmp_path, file_bytes):
    dev = torch.device("cuda", torch.cuda.current_device())
    store = PrefixStore(device_bytes=BLOCK, ram_bytes=BLOCK, disk_dir=tmp_path, disk_bytes=2 * file_bytes + 100,
                        device=dev)
    names = _names(4)
    for i, h in enumerate(names):
        store.put(h, tuple(t.to(dev) for t in _payload(i)))
        store.flush()
    assert _holds(store, "device", names) == {3} and _holds(store, "ram", names) == {2}
    assert _holds(store, "disk", names) == {2, 3}  # 0 and 1 were dropped from the last tier
    assert store.get(names[0], dev) is None
    assert store._tiers[1].entries[names[2]].flat.is_pinned()
    got = store.get(names[2], dev)  # from RAM: promoted to the device, 3 goes down to RAM
    assert got[0].device == dev and _same(got, _payload(2))
    assert _holds(store, "device", names) == {2} and _holds(store, "ram", names) == {3}
    t = _tiers(store)
    assert t["device"]["demotions"] == 4 and t["ram"]["hits"] == 1 and t["device"]["misses"] == 2


# ------------------------------------------------------------------------------------------------ visibility and options


def test_prometheus_text_parses_and_counts_move():
    parser = pytest.importorskip("prometheus_client.parser")
    store = PrefixStore(ram_bytes=4 * BLOCK)
    h = _names(1)[0]
    store.put(h, _payload(0))

    def sample(name, **labels):
        for family in parser.text_string_to_metric_families(store.prometheus_text()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        raise AssertionError(f"{name} {labels} not in the metrics")

    assert sample("ktcore_prefix_cache_hits_total", tier="ram") == 0
    assert sample("ktcore_prefix_cache_bytes", tier="ram") == BLOCK
    store.get(h, "cpu")
    store.get(b"x" * 32, "cpu")
    store.record_request(prompt_tokens=40, hit_tokens=32)
    assert sample("ktcore_prefix_cache_hits_total", tier="ram") == 1
    assert sample("ktcore_prefix_cache_misses_total", tier="ram") == 1
    assert sample("ktcore_prefix_cache_hit_tokens_total") == 32
    assert sample("ktcore_prefix_cache_prompt_tokens_total") == 40


def test_record_request_logs_one_line(caplog):
    store = PrefixStore(ram_bytes=BLOCK)
    with caplog.at_level(logging.INFO, logger="ktcore.prefix_cache"):
        store.record_request(prompt_tokens=2000, hit_tokens=1984)
    assert [r.getMessage() for r in caplog.records] == ["prefix cache: 1984 of 2000 prompt tokens restored (99%)"]


def test_options_build_the_store(tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_prefix_cache_args(p)
    defaults = p.parse_args([])
    assert defaults.prefix_cache_ram == 4 << 30 and defaults.prefix_cache_disk == 0 and defaults.prefix_block is None
    assert defaults.prefix_cache_gpu == 0
    assert defaults.prefix_cache_dir.parts[-2:] == ("ktcore", "prefix")
    store = PrefixStore.from_options(defaults, "cpu", b"salt")
    assert list(_tiers(store)) == ["ram"] and store.block_size == 16
    assert store.hashes(list(range(40))) == block_hashes(list(range(40)), 16, b"salt")

    args = p.parse_args(["--prefix-cache-ram", "0", "--prefix-cache-disk", "1.5GiB", "--prefix-cache-dir",
                         str(tmp_path / "c"), "--prefix-block", "64"])
    store = PrefixStore.from_options(args, "cpu", b"")
    assert list(_tiers(store)) == ["disk"] and _tiers(store)["disk"]["budget_bytes"] == 3 << 29
    assert store.block_size == 64 and (tmp_path / "c").is_dir()
    on_cpu = PrefixStore.from_options(p.parse_args(["--prefix-cache-gpu", "1GiB"]), "cpu", b"")
    assert list(_tiers(on_cpu)) == ["ram"]  # no GPU: RAM is the device's memory
    off = PrefixStore.from_options(p.parse_args(["--prefix-cache-ram", "0"]), "cpu", b"")
    assert not off.enabled and store.enabled

    for bad, says in ((["--prefix-cache-ram", "4 gigs"], "not a size"), (["--prefix-block", "0"], "positive")):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
        assert says in capsys.readouterr().err
    assert "--prefix-cache-disk SIZE" in p.format_help()


@CUDA
@pytest.mark.parametrize("device_bytes", [0, 1 << 20])
def test_cuda_restore_from_pinned_ram_and_device(device_bytes):
    """A model on the GPU: blocks put from CUDA tensors come back on it bit for bit, one by one and stacked,
    from the device tier or from pinned RAM."""
    dev = torch.device("cuda", torch.cuda.current_device())
    store = PrefixStore(device_bytes=device_bytes, ram_bytes=1 << 20, device=dev)
    names = _names(3)
    payloads = [_payload(i) for i in range(3)]
    store.put_many(names, [t.to(dev) for t in _stacked(payloads)])
    tier = "device" if device_bytes else "ram"
    assert _holds(store, tier, names) == {0, 1, 2}
    if not device_bytes:
        assert all(p.flat.is_pinned() for p in store._tiers[0].entries.values())
    got = store.get_many(names, dev)
    assert got[0].device == dev and _same(got, _stacked(payloads))
    assert _same(store.get(names[1], dev), payloads[1]) and _same(store.get(names[1], "cpu"), payloads[1])


def test_disk_writer_is_bounded_and_ends_when_idle(tmp_path, monkeypatch):
    """Blocks waiting for the disk hold at most MAX_PENDING_BYTES (more are not written through, and counted);
    the writer thread ends after WRITER_IDLE_S without work and the next write starts another."""
    import ktcore.prefix_cache as pc

    monkeypatch.setattr(pc, "MAX_PENDING_BYTES", 2 * BLOCK)
    monkeypatch.setattr(pc, "WRITER_IDLE_S", 0.05)
    store = PrefixStore(ram_bytes=10 * BLOCK, disk_dir=tmp_path, disk_bytes=100 * BLOCK)
    names = _names(5)
    with store._lock:  # the writer cannot take a job off the queue's bookkeeping while we hold the lock
        store.put_many(names, _stacked([_payload(i) for i in range(5)]))
        assert store._pending_bytes <= 2 * BLOCK
    store.flush()
    t = _tiers(store)["disk"]
    assert t["entries"] + t["skipped"] == 5 and t["skipped"] >= 3
    writer = store._writer
    writer.join(timeout=5)
    assert not writer.is_alive() and store._writer is None
    store.put(names[4], _payload(4))  # in RAM already: nothing to write
    store.put(_names(6)[5], _payload(5))
    store.close()
    assert _tiers(store)["disk"]["entries"] == t["entries"] + 1
