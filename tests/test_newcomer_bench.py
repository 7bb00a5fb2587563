"""`embresume bench` interrupted with Ctrl-C: one line, exit 130, no partial
results, no child left; its report fits 80 columns."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

from rich.console import Console

from embresume.bench import report
from embresume.procutil import children, pid_alive

from childsignals import sigint_default
from conftest import cli_env, cmdline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))






def test_ctrl_c_during_bench_is_one_line_and_130(tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen(sigint_default([sys.executable, "-m", "embresume", "bench", "--tiny", "--out", str(out)]),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO,
                         start_new_session=True)
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 90            # the bench's own children are up: it is measuring
        while time.monotonic() < deadline and p.poll() is None:
            kids = [k for k in children(p.pid) if "resource_tracker" not in cmdline(k)]
            if kids:
                break
            time.sleep(0.1)
        assert kids, "the bench started no child"
        time.sleep(3)
        kids = children(p.pid)
        os.killpg(p.pid, signal.SIGINT)             # what Ctrl-C at a terminal does: the whole group
        stdout, stderr = p.communicate(timeout=90)
        assert p.returncode == 130, (p.returncode, stderr[-3000:])
        assert stderr.strip().splitlines() == [f"embresume: interrupted; no results written to {out}"], stderr
        assert "Traceback" not in stdout + stderr
        assert not (out / "results.json").exists() and not list(out.glob("*.png")), list(out.iterdir())
        deadline = time.monotonic() + 10
        while any(pid_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(pid_alive(k) for k in kids), [cmdline(k) for k in kids if pid_alive(k)]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        for k in kids:
            if pid_alive(k):
                os.kill(k, signal.SIGKILL)


def _data() -> dict:
    s = {"path": "shm", "tokens": 256, "hidden": 256, "dtype": "torch.bfloat16", "bytes": 131072, "p50_s": 1e-3,
         "p99_s": 2e-3, "gbps_p50": 0.13, "verified": True}
    return {"machine": {"cpu_model": "x" * 60, "usable_cores": 2, "memory_gib": 23.5, "python": "3.11.7",
                        "torch": "2.13.0+cpu"},
            "profile": "tiny", "samples": [s, {**s, "path": "memcpy", "gbps_p50": 30.0}], "resume": [],
            "concurrency": [], "allocator": [], "paths": {"shm": {"status": "ran"}}, "warnings": [],
            "settings": {"dtype": "torch.bfloat16"}}


def test_goals_do_not_say_shm_was_not_measured_when_it_ran():
    data = _data()
    goals = report.evaluate_goals(data)
    assert goals and all("not measured" not in g["detail"] for g in goals), goals
    assert any("shm ran at other sizes" in g["detail"] for g in goals)
    data["samples"] = [x for x in data["samples"] if x["path"] != "shm"]
    assert any("shm was not measured" in g["detail"] for g in report.evaluate_goals(data))


def test_report_fits_80_columns():
    data = _data()
    data["goals"] = report.evaluate_goals(data)
    buf = io.StringIO()
    report.render(data, Console(file=buf, width=80, highlight=False))
    lines = buf.getvalue().splitlines()
    assert lines and max(len(x) for x in lines) <= 80, [x for x in lines if len(x) > 80]


def test_bench_size_too_big_for_memory_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "embresume", "bench", "--tiny", "--sizes", "100000000", "--paths",
                        "memcpy", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                       env=cli_env(), cwd=REPO)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("embresume: error: --sizes 100000000") and "GiB" in err[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_doctor_mooncake_row_has_no_internal_counters():
    from embresume.doctor import mooncake_summary
    d = {"available": True, "package": "mooncake-transfer-engine-non-cuda", "version": "0.3.13.post1",
         "support_cuda": False, "rdma_usable": False, "engines_created": 3, "engines_idle": 1,
         "max_peer_engines": 64, "log_level": "ERROR"}
    text = mooncake_summary(d)
    assert "0.3.13.post1" in text and "tcp only" in text and "unauthenticated" in text
    assert "engines" not in text and "=" not in text and "log_level" not in text, text
    assert "not installed" in mooncake_summary({"available": False})
