"""embresume.metrics: EndpointStats recording into prometheus_client, its
exposition, export_prometheus, render_text, and the library without the
'metrics' extra."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import uuid

import pytest

prometheus_client = pytest.importorskip("prometheus_client", reason="the 'metrics' extra is not installed")
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest  # noqa: E402

from embresume import metrics as M  # noqa: E402

from conftest import REPO  # noqa: E402

ALL = (M.REQUESTS_TOTAL, M.BYTES_TOTAL, M.CHUNKS_TOTAL, M.RESUMES_PER_REQUEST, M.WASTED_TOKENS,
       M.POOL_USED_BLOCKS, M.POOL_TOTAL_BLOCKS, M.FAILURES_TOTAL, M.LATENCY_SECONDS)


def val(registry, name, **labels):
    return registry.get_sample_value("embresume_" + name, labels)


def record(s: M.EndpointStats, n: int = 10) -> None:
    for i in range(n):
        s.request_started(hinted=i == 0)
        s.chunk(1024, 1024)                              # 1 MiB of rows, +16 KiB fill_ids/mrope
        s.request_succeeded(resumes=i % 3, latency_s=0.002, wasted_tokens=128)
    s.request_failed("timeout")
    s.request_failed("peer_dead")
    s.request_failed("timeout")
    s.pool(12, 256)


def test_events_land_in_prometheus_client_with_names_and_labels():
    r = CollectorRegistry()
    s = M.EndpointStats("language", r)
    record(s)
    # the endpoint's own counts: the same keys as ever
    assert dict(s) == {"requests": 10, "hinted": 1, "chunks": 10, "bytes": 10 << 20, "success": 10,
                       "wasted_tokens": 1280, "failed": 3}
    assert val(r, "requests_total", role="language") == 10
    assert val(r, "chunks_total", role="language") == 10
    assert val(r, "bytes_total", role="language") == 10 * 1024 * (1024 + 16)
    assert val(r, "failures_total", role="language", cause="timeout") == 2
    assert val(r, "failures_total", role="language", cause="peer_dead") == 1
    assert val(r, "pool_used_blocks", role="language") == 12
    assert val(r, "pool_total_blocks", role="language") == 256
    assert val(r, "latency_seconds_count", role="language") == 10
    assert val(r, "latency_seconds_sum", role="language") == pytest.approx(0.02)
    assert val(r, "latency_seconds_bucket", role="language", le="0.001") == 0
    assert val(r, "latency_seconds_bucket", role="language", le="0.0025") == 10
    assert val(r, "resumes_per_request_sum", role="language") == sum(i % 3 for i in range(10))
    assert val(r, "resumes_per_request_bucket", role="language", le="0.0") == 4
    assert val(r, "wasted_tokens_bucket", role="language", le="128.0") == 10
    s.pool(3)                                            # the total stays
    assert val(r, "pool_used_blocks", role="language") == 3
    assert val(r, "pool_total_blocks", role="language") == 256
    # the metrics are prometheus_client's own, with today's buckets and help texts
    ms = s.metrics
    assert set(ms) == set(ALL)
    assert isinstance(ms[M.REQUESTS_TOTAL], prometheus_client.Counter)
    assert isinstance(ms[M.POOL_USED_BLOCKS], prometheus_client.Gauge)
    assert isinstance(ms[M.LATENCY_SECONDS], prometheus_client.Histogram)
    assert tuple(ms[M.LATENCY_SECONDS]._upper_bounds[:-1]) == M.LATENCY_BUCKETS
    assert tuple(ms[M.RESUMES_PER_REQUEST]._upper_bounds[:-1]) == M.RESUME_BUCKETS
    assert tuple(ms[M.WASTED_TOKENS]._upper_bounds[:-1]) == M.WASTED_TOKEN_BUCKETS
    # still pickles / copies as the plain counter it reads as
    assert pickle.loads(pickle.dumps(s)) == dict(s)


def test_exposition_has_the_embresume_names():
    r = CollectorRegistry()
    record(M.EndpointStats("encoder", r), 1)
    text = generate_latest(r).decode()
    for name, (kind, help_, _labels, _b) in M._SPECS.items():
        assert f"# TYPE embresume_{name} {kind}" in text, name
        assert f"# HELP embresume_{name} {help_}" in text, name
    assert 'embresume_requests_total{role="encoder"} 1.0' in text
    assert 'embresume_failures_total{cause="timeout",role="encoder"} 2.0' in text
    assert 'embresume_latency_seconds_bucket{le="0.0025",role="encoder"} 1.0' in text
    assert 'embresume_pool_total_blocks{role="encoder"} 256.0' in text
    assert "embresume_" in text and "python_gc" not in text      # a caller's registry holds ours only


def test_two_stats_on_one_registry_share_the_metrics():
    r = CollectorRegistry()
    a = M.EndpointStats("language", r)
    b = M.EndpointStats("language", r)                  # no duplicate-registration error
    e = M.EndpointStats("encoder", r)
    assert a.metrics is b.metrics is e.metrics is M.metrics_for(r)
    a.request_started()
    b.request_started()
    e.request_started()
    a.request_failed("timeout")
    b.request_failed("timeout")
    assert val(r, "requests_total", role="language") == 2
    assert val(r, "requests_total", role="encoder") == 1
    assert val(r, "failures_total", role="language", cause="timeout") == 2
    assert a["requests"] == b["requests"] == e["requests"] == 1      # each endpoint its own counts
    # the registry holds each name once
    names = [m.name for m in r.collect()]
    assert len(names) == len(set(names)) == len(ALL)


def test_concurrent_first_use_of_a_registry_registers_once():
    r = CollectorRegistry()
    start = threading.Barrier(8)
    made, errors = [], []

    def work():
        start.wait()
        try:
            made.append(M.EndpointStats("language", r))
        except Exception as e:  # pragma: no cover - the failure this test looks for
            errors.append(e)

    ts = [threading.Thread(target=work) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors and len({id(s.metrics) for s in made}) == 1


def test_a_callers_registry_is_isolated_from_the_default_one():
    role = "isolated-" + uuid.uuid4().hex[:8]           # the default registry is shared by the whole run
    mine = CollectorRegistry()
    M.EndpointStats(role, mine).request_started()
    assert val(mine, "requests_total", role=role) == 1
    assert val(REGISTRY, "requests_total", role=role) is None
    d = M.EndpointStats(role)                            # default: prometheus_client.REGISTRY
    d.request_started()
    d.request_started()
    assert d.metrics is M.metrics_for() is M.metrics_for(REGISTRY)
    assert val(REGISTRY, "requests_total", role=role) == 2
    assert val(mine, "requests_total", role=role) == 1
    assert f'embresume_requests_total{{role="{role}"}} 2.0' in generate_latest().decode()


def test_render_text():
    r = CollectorRegistry()
    assert M.render_text(r) == ""                        # nothing recorded there
    record(M.EndpointStats("language", r))
    text = M.render_text(r)
    lines = text.splitlines()
    assert "embresume_requests_total{role=language}: 10" in lines
    assert "embresume_bytes_total{role=language}: 10.2 MiB" in lines
    assert "embresume_chunks_total{role=language}: 10" in lines
    assert "embresume_failures_total{cause=timeout,role=language}: 2" in lines
    assert "embresume_pool_used_blocks{role=language}: 12" in lines
    assert "embresume_latency_seconds{role=language}: n=10 mean=2.000 ms p50<=2.500 ms p99<=2.500 ms" in lines
    assert "embresume_resumes_per_request{role=language}: n=10 mean=0.90 p50<=1 p99<=2" in lines
    assert not any("created" in line for line in lines)
    e = M.EndpointStats("encoder", r)
    e.request_succeeded(resumes=500, latency_s=100.0)   # past the last bucket
    text = M.render_text(r)
    assert "embresume_latency_seconds{role=encoder}: n=1 mean=100000.000 ms p50>60000.000 ms" in text
    assert "embresume_resumes_per_request{role=encoder}: n=1 mean=500 p50>100 p99>100" in text


def test_event_cost_is_small():
    s = M.EndpointStats("language", CollectorRegistry())
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        s.chunk(16, 4096)
    per_call = (time.perf_counter() - t0) / n
    # two counter increments and two dict updates: about a microsecond; generous bound for a loaded machine
    assert per_call < 20e-6, per_call


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_export_prometheus_serves_over_http():
    r = CollectorRegistry()
    s = M.EndpointStats("language", r)
    record(s, 1)
    server, port = M.export_prometheus(r, port=0)
    try:
        assert port > 0 and server.server_address[0] == "127.0.0.1"
        body = _scrape(port)
        assert 'embresume_requests_total{role="language"} 1.0' in body
        assert 'embresume_latency_seconds_count{role="language"} 1.0' in body
        assert "# TYPE embresume_resumes_per_request histogram" in body
        s.request_started()                              # read on every scrape
        assert 'embresume_requests_total{role="language"} 2.0' in _scrape(port)
    finally:
        server.shutdown()
        server.server_close()


def test_export_prometheus_default_registry():
    role = "exported-" + uuid.uuid4().hex[:8]
    M.EndpointStats(role).request_started()
    server, port = M.export_prometheus()
    try:
        assert f'embresume_requests_total{{role="{role}"}} 1.0' in _scrape(port)
    finally:
        server.shutdown()
        server.server_close()


def test_export_prometheus_checks_the_port():
    for bad in (-1, 65536, "9400", True, 1.5):
        with pytest.raises(ValueError):
            M.export_prometheus(CollectorRegistry(), port=bad)


#: run in a child whose prometheus_client cannot be imported: a real transfer between
#: an EncoderEndpoint and a LanguageEndpoint over shm, then the metrics functions
WITHOUT_EXTRA = textwrap.dedent("""
    import logging, sys
    sys.modules["prometheus_client"] = None              # import prometheus_client -> ImportError
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="LOG %(name)s %(levelname)s %(message)s")
    from embresume import Config, EncoderEndpoint, LanguageEndpoint, Status, metrics
    from embresume.harness import free_port
    from embresume.synthetic import SyntheticData
    assert not metrics.enabled() and metrics.metrics_for() is None
    cfg = Config(hidden_size=256, dtype="bf16", block_size=128, default_allocate_tokens=256, pool_blocks=16,
                 encoder_endpoint=f"tcp://127.0.0.1:{free_port()}", transport="shm", prefault=False)
    data = SyntheticData(256, "bf16", 2000, seed=1)
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as lang:
        lang.request(7)
        enc.send_tensors(7, *data.sample(7, 700))        # 700 tokens into a 256-token grant: resumes
        assert lang.wait(7, 30) is Status.Success, lang.failure_reason(7)
        assert data.verify(7, lang.result(7))
        enc.drain(timeout=30)
        extra = metrics.EndpointStats("language")
        extra.request_failed("timeout")
        assert extra == {"failed": 1} and extra.metrics is None
        assert lang.stats["success"] == 1 and lang.stats["resumes"] == 1, dict(lang.stats)
        assert lang.stats["chunks"] == 2, dict(lang.stats)
        assert lang.stats["bytes"] == 700 * 256 * 2, dict(lang.stats)
        assert enc.stats["requests"] == 1 and enc.stats["chunks"] == 2, dict(enc.stats)
    assert metrics.render_text() == ""
    try:
        metrics.export_prometheus()
    except RuntimeError as e:
        assert "pip install 'embresume[metrics]'" in str(e), e
    else:
        raise AssertionError("export_prometheus without prometheus_client")
    assert "prometheus_client" not in [m for m, v in sys.modules.items() if v is not None]
    print("OK")
""")


def test_without_the_metrics_extra_one_log_line_and_counts_still_kept():
    r = subprocess.run([sys.executable, "-c", WITHOUT_EXTRA], cwd=REPO, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stdout + r.stderr
    said = [line for line in r.stderr.splitlines() if "metrics are off" in line]
    assert len(said) == 1, r.stderr
    assert said[0].startswith("LOG embresume.metrics INFO ")
    assert "pip install 'embresume[metrics]'" in said[0]
