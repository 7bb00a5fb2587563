"""`embresume bench --tiny`: every path runs, every result is verified, the
outputs have the documented shape.  Timings are never asserted."""

from __future__ import annotations

import json
import math

import pytest

from embresume.bench import run as bench_run

EXPECTED_PATHS = {"memcpy", "shm", "shm-zc", "cuda_ipc", "mooncake", "mooncake-raw", "zmq-ipc", "zmq-tcp", "mp-queue"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = bench_run.main(["--tiny", "--out", str(out), "--no-progress"])
    with open(out / "results.json") as f:
        data = json.load(f)
    return rc, out, data


def test_exit_code_and_files(tiny):
    rc, out, data = tiny
    assert rc == 0, data.get("warnings")
    for name in ("throughput.png", "resume.png", "concurrency.png", "allocator.png"):
        p = out / name
        assert p.exists() and p.stat().st_size > 1000, name
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert data["files"]["json"].endswith("results.json")


def test_machine_description(tiny):
    _, _, data = tiny
    m = data["machine"]
    for key in ("cpu_model", "logical_cores", "memory_gib", "python", "torch", "os"):
        assert key in m and m[key] not in (None, ""), key
    assert "hostname" not in json.dumps(m).lower()
    import socket
    host = socket.gethostname()
    if len(host) > 3:
        assert host not in json.dumps(data)
    assert data["profile"] == "tiny"
    assert data["schema"] == bench_run.SCHEMA


def test_paths_listed_and_verified(tiny):
    _, _, data = tiny
    paths = data["paths"]
    assert set(paths) == EXPECTED_PATHS
    for name, p in paths.items():
        assert p["status"] in ("ran", "skipped", "failed"), (name, p)
        if p["status"] == "skipped":
            assert p.get("reason"), name
        if p["status"] == "failed":
            assert p.get("error"), name
    # always available on a CPU machine
    for name in ("memcpy", "shm", "shm-zc", "zmq-ipc", "zmq-tcp", "mp-queue"):
        assert paths[name]["status"] == "ran", (name, paths[name])
    import torch
    if not torch.cuda.is_available():
        assert paths["cuda_ipc"]["status"] == "skipped"

    settings = data["settings"]
    sizes, hidden = settings["sizes"], settings["hidden"]
    assert hidden == [256] and len(sizes) == 2
    by_path: dict = {}
    for s in data["samples"]:
        by_path.setdefault(s["path"], []).append(s)
    for name, p in paths.items():
        if p["status"] != "ran":
            continue
        got = by_path.get(name, [])
        if name == "mooncake-raw":  # the other module chooses its sizes
            assert got, name
        else:
            assert sorted((s["tokens"], s["hidden"]) for s in got) == sorted((t, 256) for t in sizes), name
        for s in got:
            assert s["verified"] is True, (name, s["tokens"])
            assert s["bytes"] == s["tokens"] * s["hidden"] * 2
            for key in ("p50_s", "p99_s", "gbps_p50", "latencies_s", "ratio_memcpy", "ratio_zmq"):
                assert key in s, (name, key)
            if name != "mooncake-raw":
                assert len(s["latencies_s"]) == s["n"] == 2
                assert all(isinstance(x, float) and x > 0 for x in s["latencies_s"])


def test_resume_entries(tiny):
    _, _, data = tiny
    shm = {e["resumes"]: e for e in data["resume"] if e["path"] == "shm"}
    assert sorted(shm) == [0, 1, 3, 10]
    for k, e in shm.items():
        assert e["verified"] is True
        assert e["measured_resumes"] == [k]
        assert e["tokens"] == 8192
        assert e["chunk_tokens"] % 128 == 0
        assert len(e["latencies_s"]) >= 2
        assert "ratio_to_no_resume" in e
    assert math.isclose(shm[0]["ratio_to_no_resume"], 1.0)
    for e in data["resume"]:
        assert data["paths"][e["path"]]["status"] == "ran" and e["verified"] is True


def test_concurrency_and_allocator_entries(tiny):
    _, _, data = tiny
    shm = {e["in_flight"]: e for e in data["concurrency"] if e["path"] == "shm"}
    assert sorted(shm) == [1, 8, 32, 64]
    for n, e in shm.items():
        assert e["verified"] is True
        assert len(e["latencies_s"]) == n * e["batches"]
        assert e["throughput_gbps"] > 0
    alloc = data["allocator"]
    assert [e["pool_blocks"] for e in alloc] == [1024, 65536]
    for e in alloc:
        assert e["ops_per_s"] > 0 and len(e["ops_per_s_samples"]) == e["rounds"]


def test_goals_reported_not_asserted(tiny):
    _, _, data = tiny
    names = [g["name"] for g in data["goals"]]
    assert len(names) == 4
    for g in data["goals"]:
        assert g["status"] in ("PASS", "MISS", "N/A")
    assert data["shm_leftovers"] == []


def test_bad_arguments():
    assert bench_run.main(["--paths", "nonsense", "--no-progress"]) == 2
    assert bench_run.main(["--dtype", "int8", "--no-progress"]) == 2


def test_resume_chunk_split():
    from embresume.bench.bench_endpoints import resume_chunk
    for total in (8192, 16384, 1408):
        for k in (0, 1, 3, 10):
            c = resume_chunk(total, k)
            assert c % 128 == 0 and -(-total // c) == k + 1
    with pytest.raises(ValueError):
        resume_chunk(5000, 10)  # 40 blocks: 10 or 14 chunks, never 11


def test_normalize_raw_rows():
    import torch
    rows = [{"tokens": 1024, "hidden": 4096, "raw_tensor_ms": 2.0, "raw_block_ms": 3.0, "verified": True,
             "repeats": 5, "bytes": 123}]
    (s,) = bench_run.normalize_raw(rows, 4096, torch.bfloat16)
    assert s["bytes"] == 1024 * 4096 * 2 and math.isclose(s["p50_s"], 0.002)
    assert s["verified"] is True and s["n"] == 5
    (s,) = bench_run.normalize_raw([{"tokens": 256, "latencies_s": [0.001, 0.003]}], 256, torch.bfloat16)
    assert math.isclose(s["p50_s"], 0.002) and s["verified"] is None


def test_data_is_prefix_stable():
    import torch
    from embresume.bench.bench_common import equal_bits, make_data
    a = make_data(64, 1500, torch.bfloat16, 3)
    b = make_data(64, 4000, torch.bfloat16, 3)
    assert equal_bits(a[0], b[0][:1500]) and equal_bits(a[1], b[1][:1500]) and equal_bits(a[2], b[2][:, :1500])
    c = make_data(64, 1500, torch.bfloat16, 4)
    assert not equal_bits(a[0], c[0])
