"""`python -m bench.ab`: same-run A/B of `embresume bench` against another
commit.  One --tiny round each way against HEAD: both trees run their own code
(the import records name the worktree for A, this checkout for B), the table
and ab.json carry the figures, the worktree is gone afterwards.  Timings are
never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embresume.bench import ab

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[1]


def run_ab(*args, timeout=500):
    # bench.ab compares source trees of a checkout, run from its root (the root on the path, even
    # where the tests run against an installed wheel with PYTHONSAFEPATH set)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    return subprocess.run([sys.executable, "-m", "bench.ab", *args], cwd=str(REPO), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)


def worktrees() -> set:
    """The A/B worktrees git knows (others' worktrees of this checkout are left out)."""
    out = subprocess.run(["git", "-C", str(REPO), "worktree", "list", "--porcelain"], capture_output=True,
                         text=True, check=True).stdout
    return {line.split(" ", 1)[1] for line in out.splitlines()
            if line.startswith("worktree ") and "embresume-ab-" in line}


@pytest.fixture(scope="module")
def tiny_ab(tmp_path_factory):
    out = tmp_path_factory.mktemp("ab")
    r = run_ab("--base", "HEAD", "--rounds", "1", "--profile", "tiny", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(out / "ab.json") as f:
        return r.stdout, json.load(f), out


def test_each_tree_ran_its_own_code(tiny_ab):
    _, data, _ = tiny_ab
    a, b = data["per_round"]["A"], data["per_round"]["B"]
    assert len(a) == len(b) == 1
    tree_a, tree_b = Path(a[0]["tree"]), Path(b[0]["tree"])
    assert tree_b.resolve() == REPO.resolve()
    assert tree_a.name == "base" and "embresume-ab-" in str(tree_a) and REPO.resolve() not in tree_a.parents
    for rnd, tree in ((a[0], tree_a), (b[0], tree_b)):
        mods = rnd["imports"]["bench_modules"]
        for name in ("embresume", "embresume.cli", "embresume.bench.run", "embresume.bench.latency"):
            assert name in mods, (name, sorted(mods))
        assert mods["embresume.bench.run"] == os.path.realpath(tree / "bench" / "run.py")
        assert mods["embresume"] == os.path.realpath(tree / "embresume" / "__init__.py")
        assert all(f.startswith(os.path.realpath(tree) + os.sep) for f in mods.values()), mods
        assert rnd["imports"]["processes"] >= 2          # the bench and at least one child recorded
        assert rnd["rc"] == 0
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert data["base"]["commit"] == head


def test_table_has_the_figures(tiny_ab):
    stdout, data, _ = tiny_ab
    rows = {r["figure"]: r for r in data["table"]}
    wanted = ["1-token shm p50 us", "1-token shm p99 us"]
    big = [k for k in rows if k.startswith("shm ") and k.endswith(" GB/s")]
    assert len(big) == 2, sorted(rows)      # smallest and largest size of the tiny profile
    large = max(big, key=lambda k: int(k.split()[1].split("x")[0])).rsplit(" ", 1)[0]
    wanted += [f"{large} p50 ms", f"{large} p99 ms", f"{large} GB/s", f"{large} / memcpy", f"{large} / ZeroMQ"]
    for k in wanted:
        r = rows.get(k)
        assert r is not None, (k, sorted(rows))
        assert r["A"] > 0 and r["B"] > 0 and r["B/A"] == pytest.approx(r["B"] / r["A"]), r
        assert r["n"] == 1
        assert k in stdout
    assert "B/A" in stdout and "median of 1 round(s)" in stdout


def test_worktree_and_temp_dir_removed(tiny_ab):
    _, data, _ = tiny_ab
    tree_a = Path(data["per_round"]["A"][0]["tree"])
    assert not tree_a.exists() and not tree_a.parent.exists()
    assert str(tree_a) not in worktrees()


def test_failed_round_still_removes_the_worktree(tmp_path):
    before = worktrees()
    r = run_ab("--base", "HEAD", "--rounds", "1", "--profile", "tiny", "--out", str(tmp_path),
               "--round-timeout", "1", timeout=120)
    assert r.returncode == 1 and "ran past 1 s" in r.stderr, r.stderr
    assert worktrees() <= before
    assert not (tmp_path / "ab.json").exists()


def test_unknown_revision(tmp_path):
    r = run_ab("--base", "no-such-rev-xyz", "--out", str(tmp_path), timeout=60)
    assert r.returncode == 1 and "no-such-rev-xyz" in r.stderr


def test_figures_of_the_quick_profile_sections():
    """In-process path and baselines (the quick profile has them, tiny does not)."""
    data = {"latency": {"latency": [
        {"path": "shm", "order": "send-first", "p50_us": 100.0, "p99_us": 200.0},
        {"path": "shm", "order": "request-first", "p50_us": 999.0, "p99_us": 999.0},
        {"path": "in-process", "order": "send-first", "p50_us": 50.0, "p99_us": 80.0}],
        "baselines": [{"name": "shm ring ping-pong (64 B, 2 processes)", "p50_us": 10.0},
                      {"name": "ZeroMQ round trip (4096 B, PAIR, tcp loopback)", "p50_us": 40.0},
                      {"name": "raw Mooncake write (4096 B)", "skipped": "no"}]},
        "samples": [{"path": "shm", "tokens": t, "hidden": 4096, "p50_s": t * 1e-6, "p99_s": t * 2e-6,
                     "gbps_p50": 3.0, "ratio_memcpy": 0.5, "ratio_zmq": 9.0} for t in (1, 256, 8192)]}
    f = ab.figures(data)
    assert f["1-token shm p50 us"] == 100.0 and f["1-token shm p99 us"] == 200.0
    assert f["1-token shm / in-process"] == 2.0
    assert f["1-token shm / ring ping-pong"] == 10.0 and f["1-token shm / ZeroMQ RTT"] == 2.5
    assert f["shm 8192x4096 p50 ms"] == pytest.approx(8.192) and f["shm 1x4096 p99 ms"] == pytest.approx(0.002)
    assert "shm 256x4096 GB/s" not in f
    rows = ab.summarize({"A": [{"figures": {"x": 1.0}}, {"figures": {"x": 3.0}}],
                         "B": [{"figures": {"x": 4.0}}, {"figures": {}}]})
    assert rows == [{"figure": "x", "A": 2.0, "B": 4.0, "B/A": 2.0, "n": 1}]
