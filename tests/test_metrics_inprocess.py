"""The metrics (fusecache.metrics): counters, their snapshot (what status shows) and their
Prometheus exposition agree; the source rate comes from the once-a-second samples."""

from __future__ import annotations

import json

import pytest

from fusecache.metrics import FETCH_BUCKETS, Metrics, prometheus_registry


def test_metrics_snapshot_and_prometheus_agree():
    m = Metrics()
    snap = m.snapshot()
    assert snap["hit_ratio"] is None and snap["source_rate"] == 0.0 and "_samples" not in snap
    m.bytes_from_source = 1000
    m.bytes_served, m.bytes_served_from_cache, m.bytes_read_through = 700, 400, 100
    m.chunk_hits, m.chunk_misses = 3, 1
    m.count_error("EIO")
    m.count_error("EIO")
    m.count_error("ESTALE")
    m.observe_fetch(0.003)
    m.observe_fetch(100.0)
    m.cache_bytes, m.cache_limit_bytes = 5, 10
    snap = m.snapshot()
    assert snap["hit_ratio"] == 400 / 700 and snap["errors"] == {"EIO": 2, "ESTALE": 1} and snap["fetch_errors"] == 3
    assert snap["fetch_seconds_buckets"][FETCH_BUCKETS.index(0.005)] == 1 and snap["fetch_seconds_buckets"][-1] == 1
    json.dumps(snap)  # what the control channel sends

    registry = prometheus_registry(m)
    value = registry.get_sample_value
    assert value("fusecache_source_bytes_total") == 1000
    assert value("fusecache_served_bytes_total", {"origin": "cache"}) == 400
    assert value("fusecache_served_bytes_total", {"origin": "fetched"}) == 200
    assert value("fusecache_served_bytes_total", {"origin": "read_through"}) == 100
    assert value("fusecache_chunk_lookups_total", {"result": "miss"}) == 1
    m.passthrough_opens, m.passthrough_bytes = 2, 2000  # a 1000-byte file opened twice by the kernel
    assert m.snapshot()["hit_ratio"] == (400 + 2000) / (700 + 2000)
    assert registry.get_sample_value("fusecache_passthrough_bytes_total") == 2000
    assert value("fusecache_errors_total", {"kind": "EIO"}) == 2
    assert value("fusecache_fetch_seconds_bucket", {"le": "0.001"}) == 0
    assert value("fusecache_fetch_seconds_bucket", {"le": "0.005"}) == 1
    assert value("fusecache_fetch_seconds_bucket", {"le": "10.0"}) == 1
    assert value("fusecache_fetch_seconds_bucket", {"le": "+Inf"}) == 2
    assert value("fusecache_fetch_seconds_sum") == pytest.approx(100.003)
    assert value("fusecache_cache_limit_bytes") == 10


def test_source_rate_from_samples(monkeypatch):
    m = Metrics()
    now = [100.0]
    monkeypatch.setattr("fusecache.metrics.time.monotonic", lambda: now[0])
    m.sample()
    assert m.source_rate() == 0.0
    m.bytes_from_source = 3000
    now[0] = 102.0
    m.sample()
    assert m.source_rate() == 1500.0
