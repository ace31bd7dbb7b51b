"""GET /metrics: Prometheus text of the engine's queue and its prefix cache, parsed by prometheus_client."""

from __future__ import annotations

import httpx
import pytest
import torch

from ktcore.prefix_cache import PrefixStore, block_hashes

API_KEY = "sk-test-secret"  # the key conftest's keyed_server requires
parser = pytest.importorskip("prometheus_client.parser")


def _samples(text: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}


def test_metrics_without_a_prefix_cache(server):
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = _samples(r.text)
    assert samples[("ktcore_engine_active_sequences", ())] == 0
    assert samples[("ktcore_engine_queued_requests", ())] == 0
    assert not any(name.startswith("ktcore_prefix_cache") for name, _ in samples)


def test_metrics_count_prefix_cache_hits(server):
    srv = server
    engine = srv.server.config.app.state.kt.engine
    store = PrefixStore(ram_bytes=1 << 20, block_size=4)
    engine.prefix_store = store  # what the engine does when it has a prefix cache
    try:
        h = block_hashes(range(8), 4)
        store.put(h[0], (torch.arange(8.0), torch.ones(3, dtype=torch.bfloat16)))
        before = _samples(httpx.get(f"{srv.url}/metrics").text)
        assert before[("ktcore_prefix_cache_entries", (("tier", "ram"),))] == 1
        assert before[("ktcore_prefix_cache_hits_total", (("tier", "ram"),))] == 0
        assert store.get(h[0], "cpu") is not None and store.get(h[1], "cpu") is None
        store.record_request(prompt_tokens=9, hit_tokens=4)
        after = _samples(httpx.get(f"{srv.url}/metrics").text)
        assert after[("ktcore_prefix_cache_hits_total", (("tier", "ram"),))] == 1
        assert after[("ktcore_prefix_cache_misses_total", (("tier", "ram"),))] == 1
        assert after[("ktcore_prefix_cache_hit_tokens_total", ())] == 4
        assert after[("ktcore_prefix_cache_bytes", (("tier", "ram"),))] == 48  # 8 * 4 + 3 * 2 bytes, padded to 16
    finally:
        del engine.prefix_store


def test_metrics_need_the_api_key(keyed_server):
    assert httpx.get(f"{keyed_server.url}/metrics").status_code == 401
    r = httpx.get(f"{keyed_server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200 and "ktcore_engine_active_sequences" in r.text
