"""embresume.metrics: the registry, its snapshot and text form, the Prometheus exporter."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from embresume import metrics as M


def test_counter_gauge_histogram_basics():
    r = M.Registry()
    c = r.counter("things_total", "things")
    c.inc()
    c.inc(2)
    assert c.value == 3
    with pytest.raises(ValueError):
        c.inc(-1)
    g = r.gauge("level", "level")
    g.set(5)
    g.dec(2)
    assert g.value == 3
    h = r.histogram("lat_seconds", "latency", buckets=(0.001, 0.01, 0.1))
    for x in (0.0005, 0.001, 0.005, 0.05, 3.0):
        h.observe(x)
    v = h.value
    assert v["count"] == 5 and v["sum"] == pytest.approx(3.0565)
    # cumulative, le semantics (0.001 falls into le=0.001), +Inf holds everything
    assert v["buckets"] == {"0.001": 2, "0.01": 3, "0.1": 4, "+Inf": 5}
    assert r.counter("things_total") is c          # same name -> same metric
    with pytest.raises(ValueError):
        r.gauge("things_total")                    # ... of the same kind only
    with pytest.raises(ValueError):
        r.counter("bad name")


def test_labels():
    r = M.Registry()
    f = r.counter("failures_total", "failures", ("cause",))
    f.labels("timeout").inc()
    f.labels(cause="timeout").inc()
    f.labels("peer_dead").inc(3)
    with pytest.raises(ValueError):
        f.inc()                                    # labelled: needs .labels()
    with pytest.raises(ValueError):
        f.labels("a", "b")
    with pytest.raises(ValueError):
        f.labels(reason="x")
    assert r.value("failures_total", cause="timeout") == 2
    assert r.value("failures_total", cause="peer_dead") == 3
    assert r.value("failures_total", cause="never") == 0
    snap = r.snapshot()["failures_total"]
    assert snap["type"] == "counter"
    assert {(v["labels"]["cause"], v["value"]) for v in snap["values"]} == {("timeout", 2), ("peer_dead", 3)}


def test_snapshot_is_json_and_text_summary():
    r = M.Registry()
    m = M.StandardMetrics(r, role="language")
    for i in range(10):
        m.request_started()
        m.chunk(1 << 20)
        m.request_succeeded(resumes=i % 3, latency_s=0.002, wasted_tokens=128)
    m.request_failed("timeout")
    m.pool(12, 256)
    snap = r.snapshot()
    json.dumps(snap)
    for name in (M.REQUESTS_TOTAL, M.BYTES_TOTAL, M.CHUNKS_TOTAL, M.RESUMES_PER_REQUEST, M.WASTED_TOKENS,
                 M.POOL_USED_BLOCKS, M.POOL_TOTAL_BLOCKS, M.FAILURES_TOTAL, M.LATENCY_SECONDS):
        assert name in snap, name
    assert r.value(M.REQUESTS_TOTAL, role="language") == 10
    assert r.value(M.BYTES_TOTAL, role="language") == 10 << 20
    assert r.value(M.POOL_USED_BLOCKS, role="language") == 12
    assert r.value(M.FAILURES_TOTAL, role="language", cause="timeout") == 1
    lat = r.value(M.LATENCY_SECONDS, role="language")
    assert lat["count"] == 10 and 0.001 <= M.quantile(lat, 0.5) <= 0.0025
    res = r.value(M.RESUMES_PER_REQUEST, role="language")
    assert res["count"] == 10 and res["sum"] == sum(i % 3 for i in range(10))
    text = r.render_text()
    assert "requests_total{role=language}: 10" in text
    assert "bytes_total{role=language}: 10.0 MiB" in text
    assert "latency_seconds{role=language}: n=10" in text
    # the encoder side shares the registry under its own role
    e = M.StandardMetrics(r, role="encoder")
    e.request_started()
    assert r.value(M.REQUESTS_TOTAL, role="encoder") == 1
    assert r.value(M.REQUESTS_TOTAL, role="language") == 10


def test_quantile():
    h = {"count": 100, "buckets": {"1": 50, "2": 100, "+Inf": 100}}
    assert M.quantile(h, 0.5) == pytest.approx(1.0)
    assert M.quantile(h, 0.75) == pytest.approx(1.5)
    assert M.quantile({"count": 0, "buckets": {}}, 0.5) != M.quantile({"count": 0, "buckets": {}}, 0.5)  # nan


def test_thread_safety():
    r = M.Registry()
    c = r.counter("n_total")
    h = r.histogram("h", buckets=(1, 2))

    def work():
        for _ in range(20000):
            c.inc()
            h.observe(1)

    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert c.value == 80000
    assert h.value["count"] == 80000 and h.value["buckets"]["1"] == 80000


def test_event_cost_is_small():
    m = M.StandardMetrics(M.Registry(), role="language")
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        m.chunk(4096)
    per_call = (time.perf_counter() - t0) / n
    # two counter increments; a few hundred ns on a quiet machine, generous bound for CI noise
    assert per_call < 20e-6, per_call


def test_exporter_scrape():
    pytest.importorskip("prometheus_client", reason="prometheus_client not installed (the 'metrics' extra)")
    r = M.Registry()
    m = M.StandardMetrics(r, role="language")
    m.request_started()
    m.chunk(1000)
    m.request_succeeded(resumes=2, latency_s=0.003, wasted_tokens=100)
    m.request_failed("peer_dead")
    m.pool(3, 64)
    server, port = M.export_prometheus(r, port=0)
    try:
        assert port > 0
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'embresume_requests_total{role="language"} 1.0' in body
        assert 'embresume_bytes_total{role="language"} 1000.0' in body
        assert 'embresume_failures_total{cause="peer_dead",role="language"} 1.0' in body \
            or 'embresume_failures_total{role="language",cause="peer_dead"} 1.0' in body
        assert 'embresume_pool_used_blocks{role="language"} 3.0' in body
        assert 'embresume_latency_seconds_bucket{le="0.005",role="language"} 1.0' in body \
            or 'embresume_latency_seconds_bucket{role="language",le="0.005"} 1.0' in body
        assert 'embresume_latency_seconds_count{role="language"} 1.0' in body
        assert "# TYPE embresume_resumes_per_request histogram" in body
        # read on every scrape
        m.request_started()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'embresume_requests_total{role="language"} 2.0' in body
    finally:
        server.shutdown()
        server.server_close()


def test_exporter_without_prometheus_client(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(RuntimeError, match="prometheus.client"):
        M.export_prometheus(M.Registry())
