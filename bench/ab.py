"""Same-run A/B of ``embresume bench`` against another commit.

::

    python -m bench.ab --base <git-rev> [--rounds N] [--profile quick|tiny] [--out DIR]

A is ``<git-rev>``, checked out with ``git worktree add --detach`` in a
temporary directory (removed at the end, also on a failure, Ctrl-C or
SIGTERM); B is this working tree, uncommitted changes included.  Each round
runs the same command in A, then in B (A, B, A, B, ...: both see the same
drift of the machine's load)::

    <this interpreter> -m embresume bench --<profile> --out DIR/rounds/<A|B><i> --no-progress --no-plots

with ``PYTHONPATH`` naming that tree only.  The editable install maps
``embresume.bench`` / ``embresume.ipc`` / ``embresume.kernels`` to the
checkout it was installed from, whatever ``PYTHONPATH`` says, so a
``sitecustomize`` shim (in the temporary directory, first on
``PYTHONPATH``) drops that mapping and maps the four packages to the round's
tree, in the bench process and in every interpreter it starts.  Each of those
interpreters records the file of every ``embresume`` module it imported; a
round whose bench process (or any child that recorded) imported a module from
outside its tree fails the A/B.

The key figures of each round's ``results.json`` (1-token control-path
latency p50/p99 over shm, its ratios to the in-process path and the
baselines measured in the same run, and the throughput section's shm p50/p99,
GB/s and ratios to memcpy and the faster ZeroMQ path at the smallest and largest size) are
printed as the median over rounds for A and B and the ratio B/A, and written
with every round's figures to ``DIR/ab.json``.  Every round has a timeout
(``--round-timeout``; default 300 s for tiny, 900 s for quick).  Timings
only: no figure is judged here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

PROFILES = ("quick", "tiny")
DEFAULT_ROUND_TIMEOUT = {"tiny": 300.0, "quick": 900.0}
#: the packages of this repository and the folder each is in (pyproject's package-dir)
PACKAGES = {"embresume": "embresume", "embresume.bench": "bench", "embresume.ipc": "ipc",
            "embresume.kernels": "kernels"}
#: modules every bench process of a round must have imported from its tree
MUST_IMPORT = ("embresume", "embresume.cli", "embresume.bench.run")
TREE_ENV, RECORD_ENV = "EMBRESUME_AB_TREE", "EMBRESUME_AB_RECORD"

SHIM = r'''
# written by bench/ab.py: import embresume's packages from the tree in $EMBRESUME_AB_TREE
import os as _os
import sys as _sys

_tree = _os.environ.get("EMBRESUME_AB_TREE")
if _tree:
    import importlib.machinery as _mach
    import importlib.util as _util

    _MAP = %(packages)r

    class _TreeFinder:
        @staticmethod
        def find_spec(fullname, path=None, target=None):
            folder = _MAP.get(fullname)
            if folder is None:
                return None
            d = _os.path.join(_tree, folder)
            init = _os.path.join(d, "__init__.py")
            if _os.path.isfile(init):
                return _util.spec_from_file_location(fullname, init, submodule_search_locations=[d])
            if _os.path.isdir(d):
                spec = _mach.ModuleSpec(fullname, None, is_package=True)
                spec.submodule_search_locations = [d]
                return spec
            return None

    def _editable(f):
        mod = getattr(f, "__module__", None) or type(f).__module__
        return str(mod).startswith("__editable__")

    _sys.meta_path[:] = [f for f in _sys.meta_path if not _editable(f)]
    _sys.meta_path.insert(0, _TreeFinder)

    _record = _os.environ.get("EMBRESUME_AB_RECORD")
    if _record:
        import atexit as _atexit

        def _write_record():
            import json
            mods = {}
            for name, m in list(_sys.modules.items()):
                if name == "embresume" or name.startswith("embresume."):
                    f = getattr(m, "__file__", None)
                    if f is None:
                        p = getattr(m, "__path__", None)
                        f = list(p)[0] if p else None
                    mods[name] = f and _os.path.realpath(f)
            path = _os.path.join(_record, "%%d.json" %% _os.getpid())
            try:
                with open(path + ".tmp", "w") as fh:
                    json.dump({"pid": _os.getpid(), "argv": _sys.argv[:4], "tree": _os.path.realpath(_tree),
                               "modules": mods}, fh)
                _os.replace(path + ".tmp", path)
            except OSError:
                pass

        _atexit.register(_write_record)
''' % {"packages": PACKAGES}


class ABError(RuntimeError):
    pass


# ====================================================================== git
def _git(repo: Path, *args: str, timeout: float = 120.0) -> str:
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise ABError(f"git {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


def repo_root(start: Optional[Path] = None) -> Path:
    return Path(_git(start or Path(__file__).resolve().parent, "rev-parse", "--show-toplevel")).resolve()


def describe_tree(repo: Path) -> dict:
    head = _git(repo, "rev-parse", "--short", "HEAD")
    dirty = [line for line in _git(repo, "status", "--porcelain", "--untracked-files=no").splitlines() if line]
    return {"path": str(repo), "head": head, "modified_tracked_files": len(dirty)}


class Worktree:
    """``git worktree add --detach`` of ``rev`` under ``parent``; :meth:`remove` undoes it."""

    def __init__(self, repo: Path, rev: str, parent: Path):
        self.repo = repo
        self.commit = _git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")
        self.path = parent / "base"
        _git(repo, "worktree", "add", "--detach", str(self.path), self.commit, timeout=300)

    def remove(self) -> None:
        try:
            _git(self.repo, "worktree", "remove", "--force", str(self.path), timeout=120)
        except (ABError, subprocess.TimeoutExpired):
            shutil.rmtree(self.path, ignore_errors=True)
            try:
                _git(self.repo, "worktree", "prune", timeout=60)
            except (ABError, subprocess.TimeoutExpired):
                pass


# ====================================================================== one round
def _kill_group(proc: subprocess.Popen) -> None:
    """The round's bench and every process it started (its own session)."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
            return
        except subprocess.TimeoutExpired:
            continue


def bench_command(profile: str, out: Path) -> list:
    return [sys.executable, "-m", "embresume", "bench", f"--{profile}", "--out", str(out), "--no-progress",
            "--no-plots"]


def run_round(tree: Path, shim: Path, profile: str, out: Path, timeout: float) -> dict:
    """One ``embresume bench`` in ``tree``; returns its wall time, results and import records."""
    out.mkdir(parents=True, exist_ok=True)
    records = out / "imports"
    shutil.rmtree(records, ignore_errors=True)     # an earlier run into the same --out left its own records
    records.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(tree)])
    env[TREE_ENV], env[RECORD_ENV] = str(tree), str(records)
    cmd = bench_command(profile, out)
    t0 = time.monotonic()
    with open(out / "stdout.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=str(out), env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise ABError(f"the bench in {tree} ran past {timeout:.0f} s (log: {out / 'stdout.txt'})") from None
        finally:
            _kill_group(proc)
    wall = time.monotonic() - t0
    results = out / "results.json"
    if not results.exists():
        tail = (out / "stdout.txt").read_text(errors="replace")[-2000:]
        raise ABError(f"the bench in {tree} exited {rc} without results.json:\n{tail}")
    with open(results) as f:
        data = json.load(f)
    imports = check_imports(tree, records, proc.pid)
    return {"rc": rc, "wall_s": wall, "data": data, "imports": imports, "command": cmd}


def check_imports(tree: Path, records: Path, bench_pid: int) -> dict:
    """Every recorded embresume module of this round is a file of ``tree``; the
    bench process itself recorded, with the modules of :data:`MUST_IMPORT`."""
    root = os.path.realpath(tree) + os.sep
    procs, outside = [], []
    for p in sorted(records.glob("*.json")):
        with open(p) as f:
            rec = json.load(f)
        procs.append(rec)
        for name, file in rec["modules"].items():
            if file is None or not (file + os.sep).startswith(root):
                outside.append(f"pid {rec['pid']}: {name} from {file}")
    main = next((r for r in procs if r["pid"] == bench_pid), None)
    if main is None:
        raise ABError(f"the bench process in {tree} left no import record (was the shim loaded?)")
    missing = [m for m in MUST_IMPORT if m not in main["modules"]]
    if missing:
        raise ABError(f"the bench process in {tree} did not import {missing}")
    if outside:
        raise ABError(f"modules imported from outside {tree}: " + "; ".join(outside[:5]))
    return {"processes": len(procs), "bench_modules": main["modules"]}


# ====================================================================== figures
def _find(rows, **want) -> Optional[dict]:
    for r in rows or ():
        if all(r.get(k) == v for k, v in want.items()):
            return r
    return None


def _div(a, b) -> Optional[float]:
    try:
        return a / b if a is not None and b else None
    except TypeError:
        return None


def figures(data: dict) -> dict:
    """The key figures of one ``results.json`` (name -> number; absent: not measured)."""
    f: dict = {}
    lat = data.get("latency") or {}
    rows = lat.get("latency") or []
    shm = _find(rows, path="shm", order="send-first")
    inproc = _find(rows, path="in-process", order="send-first")
    if shm:
        f["1-token shm p50 us"] = shm.get("p50_us")
        f["1-token shm p99 us"] = shm.get("p99_us")
    if inproc:
        f["1-token in-process p50 us"] = inproc.get("p50_us")
        f["1-token shm / in-process"] = _div(f.get("1-token shm p50 us"), inproc.get("p50_us"))
    for b in lat.get("baselines") or []:
        name = str(b.get("name", ""))
        for prefix, key in (("shm ring ping-pong", "ring ping-pong"), ("ZeroMQ round trip", "ZeroMQ RTT"),
                            ("raw Mooncake write", "raw Mooncake write"), ("Python thread hop", "thread hop")):
            if name.startswith(prefix) and b.get("p50_us"):
                f[f"1-token shm / {key}"] = _div(f.get("1-token shm p50 us"), b["p50_us"])
    samples = [s for s in data.get("samples") or [] if s.get("path") in ("shm", "shm-zc") and s.get("p50_s")]
    if samples:
        hidden = max(s["hidden"] for s in samples)
        sizes = sorted({s["tokens"] for s in samples if s["hidden"] == hidden})
        for tokens in sorted({sizes[0], sizes[-1]}):
            for path in ("shm", "shm-zc"):
                s = _find(samples, path=path, tokens=tokens, hidden=hidden)
                if not s:
                    continue
                tag = f"{path} {tokens}x{hidden}"
                if path == "shm":
                    f[f"{tag} p50 ms"] = s["p50_s"] * 1e3
                    f[f"{tag} p99 ms"] = s.get("p99_s", 0) * 1e3 or None
                f[f"{tag} GB/s"] = s.get("gbps_p50")
                if path == "shm":
                    f[f"{tag} / memcpy"] = s.get("ratio_memcpy")
                    f[f"{tag} / ZeroMQ"] = s.get("ratio_zmq")      # the faster ZeroMQ path of the run
    if data.get("elapsed_s") is not None:
        f["bench wall s"] = data["elapsed_s"]
    return {k: float(v) for k, v in f.items() if isinstance(v, (int, float)) and v == v}


def summarize(rounds: dict) -> list:
    """Rows (figure, median A, median B, B/A, n) over the rounds, in first-seen order."""
    names: list = []
    for side in ("A", "B"):
        for r in rounds[side]:
            for k in r["figures"]:
                if k not in names:
                    names.append(k)
    rows = []
    for k in names:
        med = {}
        for side in ("A", "B"):
            xs = [r["figures"][k] for r in rounds[side] if k in r["figures"]]
            med[side] = statistics.median(xs) if xs else None
        rows.append({"figure": k, "A": med["A"], "B": med["B"], "B/A": _div(med["B"], med["A"]),
                     "n": min(sum(k in r["figures"] for r in rounds[s]) for s in ("A", "B"))})
    return rows


def _fmt(x: Optional[float]) -> str:
    if x is None:
        return "-"
    a = abs(x)
    return f"{x:.0f}" if a >= 1000 else f"{x:.1f}" if a >= 100 else f"{x:.2f}" if a >= 1 else f"{x:.3f}"


def format_table(rows: list, base: str, current: str, rounds: int) -> str:
    w = max([len("figure")] + [len(r["figure"]) for r in rows])
    lines = [f"A = {base}, B = {current}: median of {rounds} round(s) each, interleaved A, B",
             f"{'figure':<{w}}  {'A':>9}  {'B':>9}  {'B/A':>6}"]
    lines.append("-" * len(lines[-1]))
    for r in rows:
        ratio = "-" if r["B/A"] is None else f"{r['B/A']:.2f}"
        lines.append(f"{r['figure']:<{w}}  {_fmt(r['A']):>9}  {_fmt(r['B']):>9}  {ratio:>6}")
    return "\n".join(lines)


# ====================================================================== main
def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, metavar="REV", help="the git revision A (e.g. HEAD~3, a commit id)")
    p.add_argument("--rounds", type=int, default=3, metavar="N", help="rounds of A then B (default 3)")
    p.add_argument("--profile", choices=PROFILES, default="quick", help="bench profile (default quick)")
    p.add_argument("--out", default="ab-results", metavar="DIR", help="output directory (default ab-results/)")
    p.add_argument("--round-timeout", type=float, default=None, metavar="S",
                   help="seconds one bench run may take (default 300 for tiny, 900 for quick)")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    return a


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> dict:
    repo = repo_root()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timeout = args.round_timeout or DEFAULT_ROUND_TIMEOUT[args.profile]
    tmp = Path(tempfile.mkdtemp(prefix="embresume-ab-"))
    wt: Optional[Worktree] = None
    t0 = time.monotonic()
    try:
        shim = tmp / "shim"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(SHIM)
        wt = Worktree(repo, args.base, tmp)
        trees = {"A": wt.path, "B": repo}
        current = describe_tree(repo)
        base = f"{args.base} ({wt.commit[:10]})"
        cur = f"working tree of {current['head']}" + (f" + {current['modified_tracked_files']} modified file(s)"
                                                      if current["modified_tracked_files"] else "")
        rounds: dict = {"A": [], "B": []}
        for i in range(1, args.rounds + 1):
            for side in ("A", "B"):
                print(f"round {i}/{args.rounds}: {side} ({base if side == 'A' else cur}) ...", flush=True)
                r = run_round(trees[side], shim, args.profile, out / "rounds" / f"{side}{i}", timeout)
                fig = figures(r["data"])
                rounds[side].append({"round": i, "tree": str(trees[side]), "rc": r["rc"], "wall_s": r["wall_s"],
                                     "figures": fig,
                                     "warnings": r["data"].get("warnings", []), "imports": r["imports"],
                                     "results": str(out / "rounds" / f"{side}{i}" / "results.json")})
                print(f"  {side}{i}: {r['wall_s']:.1f} s, exit {r['rc']}, {len(fig)} figures, "
                      f"{r['imports']['processes']} process(es) imported embresume from {trees[side]}", flush=True)
        rows = summarize(rounds)
        result = {"schema": 1, "base": {"rev": args.base, "commit": wt.commit},
                  "current": current, "profile": args.profile, "rounds": args.rounds,
                  "command": bench_command(args.profile, Path("<out>")), "table": rows, "per_round": rounds,
                  "wall_s": time.monotonic() - t0}
        tmp_json = out / "ab.json.tmp"
        with open(tmp_json, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp_json, out / "ab.json")
        print()
        print(format_table(rows, base, cur, args.rounds))
        print(f"\nwall {result['wall_s']:.0f} s; wrote {out / 'ab.json'}")
        return result
    finally:
        if wt is not None:
            wt.remove()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        run(args)
        return 0
    except KeyboardInterrupt:
        print("interrupted; the worktree is removed", file=sys.stderr)
        return 130
    except (ABError, subprocess.TimeoutExpired, OSError) as e:
        print(f"bench.ab: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
