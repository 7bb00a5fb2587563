"""``embresume bench``: every transfer path of this machine, side by side, in one run.

(The command's help text is :data:`DESCRIPTION`; this docstring is for readers of the code.)

Measured (each where available, otherwise listed as skipped with the reason):

==============  ==========================================================
shm             the product, same host, CPU pools in POSIX shared memory
cuda_ipc        the product, same host, GPU pools (only with a CUDA device)
mooncake        the product over Mooncake TE (tcp here)
mooncake-raw    Mooncake ``batch_transfer_sync_write`` alone (bench.mooncake_bench)
mp-queue        torch.multiprocessing queue (shared-memory tensor passing)
zmq-ipc/-tcp    the tensors pickled over ZeroMQ (ipc:// and tcp:// loopback)
memcpy          single-thread ``copy_`` of the same bytes: the roofline
==============  ==========================================================

plus the resume overhead (same total tokens, 0/1/3/10 forced resumes), N
requests in flight, and allocator operations per second against the pool size.
Writes ``results.json`` (every sample, the machine description) and PNG plots
into ``--out`` and prints a table with ratios to memcpy and to pickle-over-ZeroMQ.

Profiles: ``--tiny`` (seconds; used by the tests), ``--quick`` (about a minute
on a 2-core machine), default ``full`` (about six minutes).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import json
import logging
import math
import os
import sys
import time
import traceback
from typing import Callable, Optional

import torch

from .bench_common import emb_bytes, machine_description, make_data, shm_objects, summarize

log = logging.getLogger("embresume.bench")

SCHEMA = 1
GiB = 1 << 30
MiB = 1 << 20

PROFILES: dict[str, dict] = {
    "full": dict(
        sizes=[256, 512, 1024, 2048, 4096, 8192, 16384, 32768], hidden=[3584, 4096, 8192],
        target_bytes=1 * GiB, min_repeats=5, max_repeats=30, warmup=1,
        resume_total=8192, resume_targets=[0, 1, 3, 10], resume_repeats=15,
        conc_tokens=2048, conc_levels=[1, 8, 32, 64], conc_batches=3,
        alloc_pools=[1024, 2048, 4096, 8192, 16384, 32768, 65536], alloc_pairs=20000, alloc_rounds=5,
        alloc_blocks=8, request_timeout=120.0, raw_repeats=5,
        fan_in=dict(encoders=[1, 4], requests=400, inflight=16, hidden=4096),
        hints=dict(requests=400, hidden=1024),
        latency=dict(requests=1000, quick=False),
    ),
    # about a minute on a 2-core VM: every section, fewer repeats; the
    # slow baselines (pickle over ZeroMQ: 0.3-0.8 s per 128 MiB message) get the fewest
    "quick": dict(
        sizes=[256, 2048, 8192, 16384], hidden=[4096],
        target_bytes=256 * MiB, min_repeats=3, max_repeats=12, warmup=1,
        resume_total=8192, resume_targets=[0, 1, 3, 10], resume_repeats=5,
        conc_tokens=512, conc_levels=[1, 8, 32, 64], conc_batches=2,
        alloc_pools=[1024, 8192, 65536], alloc_pairs=5000, alloc_rounds=3,
        alloc_blocks=8, request_timeout=60.0, raw_repeats=3, raw_max_tokens=8192,
        baseline=dict(target_bytes=64 * MiB, min_repeats=2, max_repeats=6),
        fan_in=dict(encoders=[1, 4], requests=80, inflight=16, hidden=1024),
        hints=dict(requests=100, hidden=256),
        latency=dict(requests=200, quick=True, sections=("latency", "baselines", "breakdown", "idle"),
                     idle_seconds=1.0, paths=("shm",), orders=("send-first",)),
    ),
    "tiny": dict(
        sizes=[256, 1024], hidden=[256],
        target_bytes=0, min_repeats=2, max_repeats=2, warmup=1,
        resume_total=8192, resume_targets=[0, 1, 3, 10], resume_repeats=2,
        conc_tokens=256, conc_levels=[1, 8, 32, 64], conc_batches=1,
        alloc_pools=[1024, 65536], alloc_pairs=2000, alloc_rounds=2,
        alloc_blocks=8, request_timeout=30.0, raw_repeats=2,
        fan_in=dict(encoders=[1, 2], requests=12, inflight=4, hidden=256),
        hints=dict(requests=12, hidden=256),
        latency=dict(requests=20, quick=True, sections=("latency", "breakdown"), paths=("shm",),
                     orders=("send-first",)),
    ),
}

ENDPOINT_PATHS = ("shm", "shm-zc", "cuda_ipc", "mooncake")
BASELINE_PATHS = ("zmq-ipc", "zmq-tcp", "mp-queue")
ALL_PATHS = ("memcpy",) + ENDPOINT_PATHS + ("mooncake-raw",) + BASELINE_PATHS

DESCRIPTIONS = {
    "memcpy": ("roofline", "single-thread torch copy_ of the embedding bytes into a pre-faulted buffer"),
    "shm": ("product", "EncoderEndpoint (spawned child) -> LanguageEndpoint, Config(transport='shm'), CPU pools"),
    "shm-zc": ("product", "as shm, with Config(zero_copy=True): one-chunk results are views of the pool"),
    "cuda_ipc": ("product", "EncoderEndpoint -> LanguageEndpoint, Config(transport='cuda_ipc', device='cuda:0')"),
    "mooncake": ("product", "EncoderEndpoint -> LanguageEndpoint, Config(transport='mooncake', tcp)"),
    "mooncake-raw": ("baseline", "Mooncake TE batch_transfer_sync_write alone (embresume.bench.mooncake_bench)"),
    "zmq-ipc": ("baseline", "tensors pickled over ZeroMQ ipc:// (send_pyobj) to a spawned child that unpickles "
                            "them and acks"),
    "zmq-tcp": ("baseline", "tensors pickled over ZeroMQ tcp:// on loopback to a spawned child that unpickles "
                            "them and acks"),
    "mp-queue": ("baseline", "torch.multiprocessing (spawn) queue: shared-memory tensor passing, child acks"),
}


# ====================================================================== CLI
def _ints(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


DESCRIPTION = """\
Measures every transfer path of this machine side by side, in one run:

  shm            the product, same host, CPU pools in POSIX shared memory
  shm-zc         as shm, with zero-copy receive (results are views of the pool)
  cuda_ipc       the product, same host, GPU pools (only with a CUDA device)
  mooncake       the product over the Mooncake Transfer Engine (tcp here)
  mooncake-raw   Mooncake batch_transfer_sync_write alone
  mp-queue       torch.multiprocessing queue (shared-memory tensor passing)
  zmq-ipc/-tcp   the tensors pickled over ZeroMQ (ipc:// and tcp:// loopback)
  memcpy         single-thread copy of the same bytes: the roofline

plus the resume overhead (0/1/3/10 forced resumes), N requests in flight and
allocator operations per second.  Writes results.json and PNG plots into --out
and prints tables with ratios to memcpy and to pickle-over-ZeroMQ.

Profiles: --tiny (seconds), --quick (about a minute on a 2-core machine),
the default full profile (about six minutes).  --breakdown adds where one
1-token request's time goes, step by step.  Ctrl-C stops it (exit 130) and
writes nothing."""


def _paths_arg(s: str) -> list[str]:
    paths = [p.strip() for p in s.split(",") if p.strip()]
    bad = [p for p in paths if p not in ALL_PATHS]
    if bad or not paths:
        raise argparse.ArgumentTypeError(f"unknown path(s) {','.join(bad) or repr(s)}; "
                                         f"choose from {','.join(ALL_PATHS)}")
    return paths


def add_arguments(p: argparse.ArgumentParser, verbose: bool = True) -> None:
    """The bench options (``verbose=False``: -v comes from the caller's common flags)."""
    from embresume.cli import dtype_arg, int_arg, positive_int
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", choices=sorted(PROFILES), default=None, help="profile (default: full)")
    g.add_argument("--quick", action="store_true", help="about a minute: fewer sizes, one hidden size")
    g.add_argument("--tiny", action="store_true", help="seconds: hidden 256, 2 sizes, 2 repeats, all paths")
    p.add_argument("--out", default="bench-results", metavar="DIR",
                   help="output directory (default: bench-results/)")
    p.add_argument("--sizes", type=_ints, help="token counts, e.g. 256,8192")
    p.add_argument("--hidden", type=_ints, help="hidden sizes, e.g. 4096")
    p.add_argument("--dtype", type=dtype_arg, default="bf16", help="embedding dtype (default bf16)")
    p.add_argument("--repeats", type=positive_int, metavar="N", help="repeats per size (overrides the profile's)")
    p.add_argument("--paths", type=_paths_arg, metavar="LIST", help=f"comma-separated subset of {','.join(ALL_PATHS)}")
    p.add_argument("--skip-resume", action="store_true", help="leave out the resume-overhead section")
    p.add_argument("--skip-concurrency", action="store_true", help="leave out the requests-in-flight section")
    p.add_argument("--skip-allocator", action="store_true", help="leave out the allocator section")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--breakdown", action="store_true",
                   help="also measure and print where one 1-token request's time goes, step by step")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--torch-threads", type=positive_int, default=None, metavar="N",
                   help="torch intra-op threads in the bench process and the children (default: torch's own "
                        "choice, i.e. what the library gets in production)")
    p.add_argument("--seed", type=int_arg, default=0, help="seed of the data (default 0)")
    if verbose:
        p.add_argument("--verbose", "-v", action="count", default=0, help="show embresume's log messages")


def _parser() -> argparse.ArgumentParser:
    from embresume.cli import ArgumentParser
    p = ArgumentParser(prog="embresume bench", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def _profile(args) -> tuple[str, dict]:
    name = args.config or ("quick" if args.quick else "tiny" if args.tiny else "full")
    prof = dict(PROFILES[name])
    if args.sizes:
        prof["sizes"] = sorted(set(args.sizes))
    if args.hidden:
        prof["hidden"] = list(dict.fromkeys(args.hidden))
    if args.repeats:
        prof["min_repeats"] = prof["max_repeats"] = prof["resume_repeats"] = prof["raw_repeats"] = args.repeats
        prof.pop("baseline", None)
    if args.skip_resume:
        prof["resume_targets"] = []
    if args.skip_concurrency:
        prof["conc_levels"] = []
    if args.skip_allocator:
        prof["alloc_pools"] = []
    lat = dict(prof.get("latency") or {})
    if lat:
        from .latency import SECTIONS
        sections = tuple(lat.get("sections") or SECTIONS)
        if getattr(args, "breakdown", False):
            sections = tuple(dict.fromkeys(sections + ("breakdown",)))
        else:
            sections = tuple(x for x in sections if x != "breakdown")
        lat["sections"] = sections
        prof["latency"] = lat
    return name, prof


# ====================================================================== availability
def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _mooncake_reason() -> Optional[str]:
    """None when the product's Mooncake transport can run here, else why not."""
    if importlib.util.find_spec("mooncake") is None:
        return "mooncake-transfer-engine is not installed"
    try:
        if importlib.util.find_spec("embresume.transport.mooncake") is None:
            return "embresume.transport.mooncake does not exist yet"
        mod = importlib.import_module("embresume.transport.mooncake")
    except Exception as e:
        return f"embresume.transport.mooncake does not import: {_err(e)}"
    try:
        # through the transport: it sets Mooncake's log level before the first import
        if callable(getattr(mod, "import_mooncake", None)):
            mod.import_mooncake()
        else:
            from mooncake.engine import TransferEngine  # noqa: F401
    except Exception as e:
        return f"mooncake.engine does not import: {_err(e)}"
    return None


def _mooncake_raw():
    """(module, None) or (None, reason)."""
    if importlib.util.find_spec("mooncake") is None:
        return None, "mooncake-transfer-engine is not installed"
    try:
        if importlib.util.find_spec("embresume.bench.mooncake_bench") is None:
            return None, "embresume.bench.mooncake_bench does not exist"
        mod = importlib.import_module("embresume.bench.mooncake_bench")
    except Exception as e:
        return None, f"embresume.bench.mooncake_bench does not import: {_err(e)}"
    if not callable(getattr(mod, "run", None)):
        return None, "embresume.bench.mooncake_bench has no run()"
    return mod, None


_LAT_KEYS = ("latencies_s", "samples_s", "times_s", "latencies", "samples")
#: median-time keys of bench.mooncake_bench rows, preferred first: the raw
#: batch_transfer_sync_write of a tensor source is what the product path does
_P50_MS_KEYS = ("raw_tensor_ms", "raw_block_ms", "raw_ms", "p50_ms")


def normalize_raw(rows, hidden: int, dtype: torch.dtype, path: str = "mooncake-raw") -> list[dict]:
    """Rows of ``bench.mooncake_bench.run()`` as samples of this module.

    Throughput is always computed from the embedding bytes (as for every other
    path); the row's own fields are kept under ``raw``.
    """
    out = []
    for r in rows or []:
        if not isinstance(r, dict):
            continue
        t = int(r.get("tokens") or r.get("num_tokens") or 0)
        h = int(r.get("hidden") or hidden)
        if t <= 0:
            continue
        nbytes = emb_bytes(t, h, dtype)
        s = {"path": path, "tokens": t, "hidden": h, "dtype": str(dtype), "bytes": nbytes,
             "source": "embresume.bench.mooncake_bench.run",
             "raw": {k: v for k, v in r.items() if isinstance(v, (int, float, str, bool))}}
        lat = next((r[k] for k in _LAT_KEYS if isinstance(r.get(k), (list, tuple)) and r[k]), None)
        if lat is not None:
            lat = [float(x) for x in lat]
            s["latencies_s"] = lat
            s.update(summarize(lat, nbytes))
        else:
            key = next((k for k in _P50_MS_KEYS if _num(r.get(k))), None)
            p50 = r[key] / 1e3 if key else (r["p50_s"] if _num(r.get("p50_s")) else float("nan"))
            p99 = r["p99_ms"] / 1e3 if _num(r.get("p99_ms")) else (r["p99_s"] if _num(r.get("p99_s")) else float("nan"))
            s.update({"latencies_s": [], "n": int(r.get("repeats") or r.get("n") or 0), "p50_s": p50,
                      "p99_s": p99, "statistic": f"median from {key or 'p50_s'}",
                      "gbps_p50": nbytes / p50 / 1e9 if _num(p50) and p50 > 0 else float("nan")})
        s["verified"] = r.get("verified") if isinstance(r.get("verified"), bool) else None
        out.append(s)
    return out


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ====================================================================== the run
class _Run:
    def __init__(self, profile_name: str, prof: dict, dtype: torch.dtype, seed: int, paths: list[str],
                 tick: Callable[[str], None], verbose: bool):
        self.name, self.prof, self.dtype, self.seed = profile_name, prof, dtype, seed
        self._t0 = time.perf_counter()
        self.timeline: list = []

        def _tick(desc: str) -> None:
            self.timeline.append([desc, round(time.perf_counter() - self._t0, 3)])
            tick(desc)

        self.tick = _tick
        self.verbose = verbose
        self.data: dict = {
            "schema": SCHEMA, "tool": "embresume bench", "profile": profile_name,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_description(),
            "settings": {**prof, "dtype": str(dtype), "seed": seed, "block_size": 128,
                         "throughput_unit": "GB/s = 1e9 embedding bytes per second, at the p50 latency"},
            "paths": {}, "samples": [], "resume": [], "concurrency": [], "allocator": [], "goals": [],
            "warnings": [],
        }
        self.wanted = paths
        self.active: dict[str, object] = {}
        self.raw_mod = None

    # ------------------------------------------------------------ bookkeeping
    def mark(self, path: str, status: str, reason: str = "") -> None:
        kind, desc = DESCRIPTIONS[path]
        entry = {"status": status, "kind": kind, "description": desc}
        if reason:
            entry["reason" if status == "skipped" else "error"] = reason
        self.data["paths"][path] = entry

    def fail(self, path: str, e: BaseException) -> None:
        msg = _err(e)
        if self.verbose:
            msg += "\n" + traceback.format_exc(limit=6)
        self.mark(path, "failed", msg)
        self.data["warnings"].append(f"path {path} failed and was dropped: {_err(e).splitlines()[0]}")
        obj = self.active.pop(path, None)
        if obj is not None and hasattr(obj, "close"):
            try:
                obj.close()
            except Exception:
                pass

    # ------------------------------------------------------------ set-up
    def start(self) -> None:
        from .baselines import MpQueue, ZmqPickle
        from .bench_endpoints import EndpointBench
        for p in ALL_PATHS:
            if p not in self.wanted:
                self.mark(p, "skipped", "not selected with --paths")
        pending = []
        for p in self.wanted:
            try:
                if p == "memcpy":
                    self.mark(p, "ran")
                elif p == "shm":
                    pending.append((p, EndpointBench(p, "shm", "cpu", self.dtype, self.seed, self.prof,
                                                     quiet=not self.verbose, wait=False)))
                elif p == "shm-zc":
                    pending.append((p, EndpointBench(p, "shm", "cpu", self.dtype, self.seed, self.prof,
                                                     quiet=not self.verbose, wait=False,
                                                     lang_kw={"zero_copy": True}, sweep_only=True)))
                elif p == "cuda_ipc":
                    if not torch.cuda.is_available():
                        self.mark(p, "skipped", "no CUDA device (torch.cuda.is_available() is False)")
                        continue
                    pending.append((p, EndpointBench(p, "cuda_ipc", "cuda:0", self.dtype, self.seed, self.prof,
                                                     quiet=not self.verbose, wait=False)))
                elif p == "mooncake":
                    why = _mooncake_reason()
                    if why:
                        self.mark(p, "skipped", why)
                        continue
                    pending.append((p, EndpointBench(p, "mooncake", "cpu", self.dtype, self.seed, self.prof,
                                                     quiet=not self.verbose, wait=False)))
                elif p == "mooncake-raw":
                    self.raw_mod, why = _mooncake_raw()
                    self.mark(p, "skipped", why) if why else self.mark(p, "ran")
                elif p in ("zmq-ipc", "zmq-tcp"):
                    pending.append((p, ZmqPickle(p.split("-")[1], wait=False)))
                elif p == "mp-queue":
                    pending.append((p, MpQueue(wait=False)))
            except Exception as e:
                self.fail(p, e)
        for p, obj in pending:  # the children import torch in parallel; wait for each
            try:
                (obj.child if hasattr(obj, "child") else obj).wait_ready(120)
                self.active[p] = obj
                self.mark(p, "ran")
            except Exception as e:
                self.active[p] = obj
                self.fail(p, e)

    def close(self) -> None:
        for p, obj in list(self.active.items()):
            try:
                obj.close()
            except Exception as e:
                self.data["warnings"].append(f"closing {p}: {_err(e)}")
        self.active.clear()

    # ------------------------------------------------------------ experiments
    def run(self) -> None:
        from . import baselines
        from .bench_allocator import allocator_ops
        prof = self.prof
        sizes = prof["sizes"]
        hiddens = prof["hidden"]
        side_hidden = 4096 if 4096 in hiddens else hiddens[0]
        max_tokens = max(sizes + ([prof["resume_total"]] if prof["resume_targets"] else [])
                         + ([prof["conc_tokens"]] if prof["conc_levels"] else []))
        for h in hiddens:
            expected = make_data(h, max_tokens, self.dtype, self.seed)
            if "memcpy" in self.wanted:
                try:
                    self.data["samples"] += baselines.memcpy(expected, h, sizes, self.dtype, prof, self.tick)
                except Exception as e:
                    self.fail("memcpy", e)
            for p in ENDPOINT_PATHS:
                eb = self.active.get(p)
                if eb is None:
                    continue
                try:
                    eb.open(h, max_tokens, expected)
                    self.data["samples"] += eb.sweep(sizes, self.tick)
                    if eb.sweep_only:
                        eb.child.call("close", timeout=60)
                        continue
                    if h == side_hidden and prof["resume_targets"]:
                        self.data["resume"] += eb.resume(prof["resume_total"], prof["resume_targets"], self.tick)
                    if h == side_hidden and prof["conc_levels"]:
                        self.data["concurrency"] += eb.concurrency(prof["conc_tokens"], prof["conc_levels"],
                                                                   self.tick)
                    eb.child.call("close", timeout=60)
                except Exception as e:
                    self.fail(p, e)
            if self.raw_mod is not None:
                try:
                    raw_sizes = [t for t in sizes if t <= prof.get("raw_max_tokens", max(sizes))] or sizes[:1]
                    rows = self.raw_mod.run(raw_sizes, h, self.dtype, prof["raw_repeats"], False)
                    self.data["samples"] += normalize_raw(rows, h, self.dtype)
                    for t in sizes:
                        self.tick(f"mooncake-raw {t}x{h}")
                except Exception as e:
                    self.raw_mod = None
                    self.mark("mooncake-raw", "failed", _err(e))
                    self.data["warnings"].append(f"path mooncake-raw failed and was dropped: {_err(e)}")
            bprof = {**prof, **prof.get("baseline", {})}  # the baselines' own repeat counts, if the profile has them
            for p in BASELINE_PATHS:
                b = self.active.get(p)
                if b is None:
                    continue
                try:
                    self.data["samples"] += b.measure(expected, h, sizes, self.dtype, self.seed, bprof, self.tick)
                except Exception as e:
                    self.fail(p, e)
            del expected
        if prof.get("fan_in") and "shm" in self.wanted:
            from .bench_topology import run_fan_in
            f = prof["fan_in"]
            try:
                self.data["fan_in"] = run_fan_in(tuple(f["encoders"]), f["requests"], f["inflight"], f["hidden"],
                                                 "shm", self.seed)
            except Exception as e:
                self.data["warnings"].append(f"fan-in bench failed: {_err(e)}")
            self.tick("fan-in")
        if prof.get("hints") and "shm" in self.wanted:
            from .bench_topology import run_hints
            try:
                self.data["hints"] = run_hints(prof["hints"]["requests"], prof["hints"]["hidden"], self.seed)
            except Exception as e:
                self.data["warnings"].append(f"hint bench failed: {_err(e)}")
            self.tick("hints")
        if prof.get("latency") and "shm" in self.wanted:
            from .latency import run_latency
            try:
                self.data["latency"] = run_latency(**prof["latency"])
            except Exception as e:
                self.data["warnings"].append(f"latency bench failed: {_err(e)}")
            self.tick("latency")
        if prof["alloc_pools"]:
            self.data["allocator"] = allocator_ops(prof["alloc_pools"], prof["alloc_pairs"], prof["alloc_blocks"],
                                                   prof["alloc_rounds"], self.tick)

    def steps(self) -> int:
        p = self.prof
        sweep_paths = len([x for x in self.wanted if x in ALL_PATHS])
        ep = len([x for x in self.wanted if x in ENDPOINT_PATHS and x != "shm-zc"])
        extra = ("shm" in self.wanted) * (bool(p.get("fan_in")) + bool(p.get("hints")) + bool(p.get("latency")))
        return (len(p["sizes"]) * len(p["hidden"]) * sweep_paths
                + ep * (len(p["resume_targets"]) + len(p["conc_levels"])) + len(p["alloc_pools"]) + extra)


def _progress(enabled: bool):
    """(context manager, tick function, finish function)."""
    if not enabled:
        import contextlib
        return contextlib.nullcontext(), (lambda total: None), (lambda desc: None), (lambda: None)
    import shutil

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    prog = Progress(SpinnerColumn(), TextColumn("[bold]bench[/] {task.description:<34}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True, width=min(80, shutil.get_terminal_size((80, 24)).columns)),
                    transient=True)
    task = prog.add_task("starting", total=None)

    def set_total(total: int) -> None:
        prog.update(task, total=total)

    def tick(desc: str) -> None:
        prog.update(task, advance=1, description=desc)

    def finish() -> None:
        t = prog.tasks[0]
        prog.update(task, completed=t.total or t.completed, description="done")

    return prog, set_total, tick, finish


def _memory_needed(prof: dict, dtype: torch.dtype) -> int:
    """Bytes the largest size needs at once: the expected data (twice the largest
    message, as make_data builds it), a copy in flight and the receiving side's."""
    tokens = max(prof["sizes"] + ([prof["resume_total"]] if prof["resume_targets"] else []))
    hidden = max(prof["hidden"])
    return 4 * tokens * hidden * torch.empty((), dtype=dtype).element_size()


def _memory_available() -> Optional[int]:
    try:
        from embresume.ipc.shm import memory_free_bytes
        free = memory_free_bytes()
    except Exception:  # pragma: no cover - no /proc
        return None
    return free[0] if free else None


def _loadavg() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not available
        return None


def main(argv: Optional[list] = None) -> int:
    """``embresume bench`` on its own (``python -m embresume.bench.run``); returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error (already printed, one line)
        return e.code if isinstance(e.code, int) else 2
    return run(args)


def run(args: argparse.Namespace) -> int:
    from embresume.config import parse_dtype
    from embresume.errors import ConfigError
    try:
        dtype = parse_dtype(args.dtype)
    except ConfigError as e:
        print(f"embresume: error: {e}", file=sys.stderr)
        return 2
    from embresume.cli import set_mooncake_log_level
    set_mooncake_log_level(args.verbose)  # before mooncake is first imported (children inherit it)
    name, prof = _profile(args)
    paths = list(args.paths) if args.paths else list(ALL_PATHS)
    need = _memory_needed(prof, dtype)
    avail = _memory_available()
    if avail is not None and need > avail:
        print(f"embresume: error: --sizes {max(prof['sizes'])} x hidden {max(prof['hidden'])} needs about "
              f"{need / GiB:.1f} GiB of memory for the data and its copies; {avail / GiB:.1f} GiB is available "
              "(choose smaller --sizes or --hidden)", file=sys.stderr)
        return 2

    out_dir = args.out
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        print(f"embresume: error: cannot create the output directory {out_dir}: {e.strerror}", file=sys.stderr)
        return 2

    elog = logging.getLogger("embresume")
    old_level = elog.level
    old_omp = os.environ.get("OMP_NUM_THREADS")
    old_threads = torch.get_num_threads()
    if not args.verbose:
        elog.setLevel(logging.ERROR)
    if args.torch_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # the spawned children inherit it
        torch.set_num_threads(args.torch_threads)
    shm_before = shm_objects()
    t_start = time.perf_counter()
    load_start = _loadavg()
    show = not args.no_progress and sys.stderr.isatty()   # a bar in a pipe or a file is noise
    ctx, set_total, tick, finish = _progress(show)
    run = _Run(name, prof, dtype, args.seed, paths, tick, args.verbose)
    run.data["settings"]["torch_threads"] = args.torch_threads or f"default ({old_threads})"
    interrupted = False
    failure = None
    try:
        with ctx:
            set_total(run.steps())
            try:
                run.start()
                run.run()
            except KeyboardInterrupt:
                interrupted = True
                from embresume.procutil import terminate_children
                terminate_children()     # the children stop now; the clean-up below finds nothing busy
            except Exception as e:       # outside any one path (the data itself): one line, no traceback
                failure = e
                if args.verbose:
                    traceback.print_exc()
            finally:
                run.close()
            if not interrupted and failure is None:
                finish()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        elog.setLevel(old_level)
        if old_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old_omp
        torch.set_num_threads(old_threads)
    if interrupted:
        # partial figures would read as a finished run: nothing is written
        print(f"embresume: interrupted; no results written to {out_dir}", file=sys.stderr)
        return 130
    if failure is not None:
        print(f"embresume: error: {_err(failure).splitlines()[0]}" + ("" if args.verbose else
              " (run with -v for the traceback)"), file=sys.stderr)
        return 1
    data = run.data
    data["timeline"] = run.timeline  # [step, seconds since start] as the progress bar saw them
    data["elapsed_s"] = round(time.perf_counter() - t_start, 2)
    data["load_average"] = {"start": load_start, "end": _loadavg()}
    cores = data["machine"].get("usable_cores") or 1
    busy = max((x[0] for x in data["load_average"].values() if x), default=0.0)
    if busy > 0.5 * cores:
        data["warnings"].append(f"the machine was busy (1-min load average up to {busy:.2f} on {cores} cores): "
                                "other processes competed with the measurement; timings are noisy")

    # nothing of ours may stay in /dev/shm
    deadline = time.monotonic() + 3
    while True:
        left = sorted(shm_objects() - shm_before)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    data["shm_leftovers"] = left
    if left:
        data["warnings"].append(f"shared-memory objects left in /dev/shm after the run: {left}")

    from .report import add_ratios, evaluate_goals, render
    add_ratios(data["samples"])
    data["goals"] = evaluate_goals(data)
    bad = [f"{s['path']} {s['tokens']}x{s['hidden']}" for s in data["samples"] if s.get("verified") is False]
    bad += [f"{e['path']} resume x{e['resumes']}" for e in data["resume"] if not e["verified"]]
    bad += [f"{e['path']} concurrency {e['in_flight']}" for e in data["concurrency"] if not e["verified"]]
    if bad:
        data["warnings"].append(f"results that did NOT match the sent data: {bad}")

    json_path = os.path.join(out_dir, "results.json")
    data["files"] = {"json": json_path}
    if not args.no_plots:
        try:
            from .plots import write_all
            data["files"]["plots"] = write_all(data, out_dir)
        except Exception as e:
            data["warnings"].append(f"plots not written: {_err(e)}")
    tmp = json_path + ".partial"
    with open(tmp, "w") as f:     # renamed when complete: an interrupted write leaves no results.json
        json.dump(data, f, indent=1, default=str, allow_nan=True)
    os.replace(tmp, json_path)
    from rich.console import Console
    # the tables fit 80 columns (they fold below that); so does a pipe or a file
    import shutil
    width = min(80, shutil.get_terminal_size((80, 24)).columns) if sys.stdout.isatty() else 80
    console = Console(width=width, highlight=False)
    render(data, console)
    from .bench_topology import format_fan_in, format_hints
    if data.get("latency"):
        from .latency import format_summary
        console.print("\ncontrol-path latency" + (" and where the time goes:" if args.breakdown else
                                                  " (--breakdown: where the time goes):"))
        console.print(format_summary(data["latency"], breakdown=args.breakdown), soft_wrap=True)
    if data.get("fan_in"):
        console.print("\nM encoders -> one language endpoint (shm, same workload):")
        console.print(format_fan_in(data["fan_in"]), soft_wrap=True)
    if data.get("hints"):
        console.print("\nsize hints on one seeded workload of image sizes (Qwen2-VL token counts):")
        console.print(format_hints(data["hints"]), soft_wrap=True)
    console.print(f"wrote {json_path}" + (f" and {len(data['files'].get('plots', []))} plots" if not args.no_plots
                                            else "") + f" in {data['elapsed_s']:.1f}s")
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
