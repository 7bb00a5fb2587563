"""The control-path latency benchmark (``embresume.bench.latency``): every
section runs with tiny counts, every request succeeds and is verified, the
result has the documented shape.  Timings are never asserted."""

from __future__ import annotations

import json
import math

import pytest

from embresume.bench import latency

REQUESTS = 30


@pytest.fixture(scope="module")
def result():
    return latency.run_latency(requests=REQUESTS, quick=True, idle_seconds=0.5, copy_tokens=(256,), copy_repeats=3,
                               conc_tokens=128, conc_levels=(2, 4), conc_batches=1, breakdown_paths=("shm",))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_every_request_succeeded(result):
    assert not result["errors"], "\n".join(result["errors"])
    assert result["all_ok"]


def test_one_token_rows(result):
    rows = {(r["path"], r["order"]): r for r in result["latency"]}
    from embresume.config import Config
    spin = Config().ring_spin_us
    expected = {("shm", "send-first"), ("shm", "request-first"), ("in-process", "send-first"),
                ("in-process", "request-first"), ("shm paced 1 ms", "send-first"),
                (f"shm, ring_spin_us={spin} (A/B)", "send-first"), ("shm, ring_spin_us=0 (A/B)", "send-first")}
    if "mooncake" in result["skipped"]:
        assert result["skipped"]["mooncake"]
    else:
        expected |= {("mooncake", "send-first"), ("mooncake", "request-first")}
    assert set(rows) == expected
    for key, r in rows.items():
        assert r["n"] == REQUESTS, key
        assert r["failed"] == 0 and r["mismatched"] == 0, (key, r["errors"])
        assert _finite(r["p50_us"]) and r["p50_us"] > 0, key
        assert r["min_us"] <= r["p50_us"] <= r["p99_us"] <= r["max_us"], key
        if r["order"] == "request-first":
            assert r["measured"] == "send_tensors->result"
            assert r["request_to_result"]["n"] == REQUESTS


def test_baselines(result):
    names = [b["name"] for b in result["baselines"]]
    assert len(names) == 4
    for b in result["baselines"]:
        if "skipped" in b:
            assert b["skipped"], b["name"]
            continue
        assert b["n"] >= 200 and _finite(b["p50_us"]) and b["p50_us"] > 0, b["name"]
    ran = {b["name"].split(" (")[0] for b in result["baselines"] if "skipped" not in b}
    assert {"shm ring ping-pong", "ZeroMQ round trip", "Python thread hop and back"} <= ran


def test_breakdown(result):
    rows = {(b["path"], b["order"]): b for b in result["breakdown"]}
    assert set(rows) == {("shm", "send-first"), ("shm", "request-first")}
    for key, b in rows.items():
        assert b["rooms"] == REQUESTS, key
        assert isinstance(b["missing_probes"], list)
        assert b["e2e_instrumented"]["failed"] == 0
        events = [e["event"] for e in b["events"]]
        assert events[0] == b["start"] and events[-1] == "caller.result_returned", (key, events)
        assert len(b["segments"]) == len(events) - 1 >= 4, key
        for s in b["segments"]:
            assert _finite(s["median_us"]) and s["n"] > 0, (key, s)
        offsets = [e["median_offset_us"] for e in b["events"]]
        assert offsets == sorted(offsets)
    sf = rows[("shm", "send-first")]
    seen = {e["event"] for e in sf["events"]}
    if not sf["missing_probes"]:   # the endpoints still have the methods the probes wrap
        assert {"request", "lang.init_send_start", "enc.recv_woke", "enc.decoded", "enc.write_start",
                "enc.data_written", "lang.recv_woke", "lang.copy_done", "caller.wait_returned"} <= seen


def test_copy_overhead(result):
    rows = {(r["path"], r["tokens"]): r for r in result["copy_overhead"]}
    assert set(rows) == {("merged (default)", 256), ("zero-copy", 256)}
    for key, r in rows.items():
        assert r["failed"] == 0 and r["mismatched"] == 0, key
        assert r["n"] == 3 and _finite(r["ratio_p50"]) and r["ratio_p50"] > 0, key
        assert r["copies_needed"] == (1 if r["path"] == "zero-copy" else 2)


def test_idle_and_concurrency(result):
    (idle,) = result["idle_cpu"]
    assert idle["pair"] == "shm" and idle["seconds"] > 0
    assert idle["language_cpu_pct"] >= 0 and idle["encoder_cpu_pct"] >= 0
    levels = [r["in_flight"] for r in result["concurrency"]]
    assert levels == [2, 4]
    for r in result["concurrency"]:
        assert r["failed"] == 0 and r["mismatched"] == 0
        assert r["throughput_gbps"] > 0


def test_report_and_json(result):
    text = latency.format_table(result)
    for s in ("1-token request", "Breakdown: shm, send-first", "baseline (same run)", "copy overhead",
              "idle pair", "in flight", "goal"):
        assert s in text, s
    back = json.loads(json.dumps(result))
    assert back["requests"] == REQUESTS and back["schema"] == latency.SCHEMA
    assert {g["goal"] for g in back["goals"]}


def test_cli_writes_json(tmp_path):
    out = tmp_path / "lat.json"
    rc = latency.main(["--requests", "20", "--quick", "--sections", "latency", "--paths", "shm",
                       "--orders", "send-first", "--json", str(out), "-q"])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = {(r["path"], r["order"]): r for r in data["latency"]}
    from embresume.config import Config
    assert set(rows) == {("shm", "send-first"), ("shm paced 1 ms", "send-first"),
                         (f"shm, ring_spin_us={Config().ring_spin_us} (A/B)", "send-first"),
                         ("shm, ring_spin_us=0 (A/B)", "send-first")}
    row = rows[("shm", "send-first")]
    assert row["n"] == 20 and row["failed"] == 0


def test_bench_summary_fits_80_columns_and_speaks_plainly(result):
    short = latency.format_summary(result)
    assert "where one request's time goes" not in short          # the breakdown is behind --breakdown
    text = latency.format_summary(result, breakdown=True)
    lines = text.splitlines()
    assert max(len(x) for x in lines) <= 80, [x for x in lines if len(x) > 80]
    assert "where one request's time goes: shm, send-first" in text
    assert "->" not in text and "lang." not in text and "enc." not in text, text
    for line in lines:                                            # no negative median is shown
        if line.startswith("  ") and len(line.split()) >= 4:
            assert not line.split()[-3].startswith("-"), line


def test_bench_breakdown_flag():
    from embresume.bench import run as bench_run
    p = bench_run._parser()
    _, prof = bench_run._profile(p.parse_args(["--quick"]))
    assert "breakdown" not in prof["latency"]["sections"]
    _, prof = bench_run._profile(p.parse_args(["--quick", "--breakdown"]))
    assert "breakdown" in prof["latency"]["sections"]
    _, prof = bench_run._profile(p.parse_args([]))
    assert "breakdown" not in prof["latency"]["sections"] and "copy" in prof["latency"]["sections"]
