"""Benchmark inside a real vLLM: EmbresumeECConnector against vLLM's ECExampleConnector.

    python -m embresume.bench.vllm_engine [--images 60] [--out DIR]
    python -m embresume.bench.vllm_engine --model wide [--images 8] [--out DIR]

Needs the engine environment of the real-engine tests (``bash
tests/engine/setup_venv.sh``, or ``EMBRESUME_VLLM_PYTHON``) and a checkout
(it drives ``tests/engine/vllm_roles.py``).  Same model (the tiny random
Qwen2-VL of tests/engine/make_tiny_qwen2vl.py), same images (``--images``
seeded noise images of 56, 84 and 112 pixels: 4, 9 and 16 embedding
tokens), same machine, one run:

* for each connector a producer instance encodes every image, then a consumer
  instance answers them one by one with one new token: its latency per image
  is the time to first token at the consumer (request in, first token out,
  the transfer of the image's embedding included);
* embresume also reports its per-item transfer time (request to landed in the
  consumer's landing region) from vLLM's ``vllm:embresume_ec_transfer_seconds``;
* a single instance (no disaggregation) answers the same images as the floor.

``--model wide`` runs the tiny-but-wide Qwen2.5-VL of
tests/engine/make_tiny_wide.py instead (the LM 3584 wide, as Qwen2.5-VL-7B,
bf16) on images of 448 and 1344 pixels: items of 2 and 16 MiB, where the
transfer layer matters.  ECExampleConnector then runs twice, its files on
tmpfs (/dev/shm) and on disk; the single instance runs with an idle second
instance beside it (every row shares the machine with two instances); and a
memcpy of each item's bytes (single-threaded, cold buffers), in this process,
is the floor.  By default the paths run at once, interleaved request by
request (all three producers, then the single instance and the three consumers
in turn, the order rotating: every path sees the same drift of a shared
machine's load); ``--sequential`` runs them one after the other, the single
instance beside an idle instance.  Then, per image size, throughput: ``--concurrency`` (default
1, 8 and 32) requests at once over new images (at least 4 per set), in
images per second, the tokens checked against the single instance's.

vLLM's ECCPUConnector needs the V2 model runner, which needs Triton's GPU
backend: it does not run on a CPU-only machine, so it is not in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "tests" / "engine"
SIZES = (56, 84, 112)
#: --model wide: image sizes and the model's width (tests/engine/make_tiny_wide.py qwen2_5_vl)
WIDE_SIZES = (448, 1344)
WIDE_TOKENS = {448: 256, 1344: 2304}
WIDE_WIDTH = 3584


def _python() -> str:
    env = os.environ.get("EMBRESUME_VLLM_PYTHON")
    if env:
        return env
    local = ROOT / ".venv-vllm" / "bin" / "python"
    if local.exists():
        return str(local)
    sys.exit("no vLLM engine environment: run `bash tests/engine/setup_venv.sh` "
             "(or set EMBRESUME_VLLM_PYTHON)")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    # unpinned: vLLM's CPU build would pin both instances' workers to the same core (see
    # tests/test_vllm_engine.py)
    env = dict(os.environ, PYTHONPATH=str(ENGINE), VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    return env


def _q(values, q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def _hist_q(hist: dict, q: float) -> float:
    """A quantile from a Prometheus histogram's cumulative buckets (upper bound of its bucket)."""
    buckets = sorted((float(k), v) for k, v in (hist.get("buckets") or {}).items())
    count = hist.get("count") or 0
    if not count:
        return float("nan")
    for le, cum in buckets:
        if cum >= q * count:
            return le
    return float("inf")


def _run(args, log: Path, timeout: float, stdin=subprocess.DEVNULL):
    f = open(log, "w")
    p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=stdin, env=_env(),
                         cwd=str(log.parent), start_new_session=True)
    return p, f


def _stop(p, f) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, 15)
            p.wait(20)
        except Exception:
            os.killpg(p.pid, 9)
            p.wait(10)
    f.close()


#: extra vllm_roles.py arguments of the model in use (--model wide: longer prompts, bf16)
ROLE_ARGS: list = []


def role_cmd(py, model: Path, out: Path, role_: str, images: str, connector: str, *, encoder="", storage="",
             extra=None, throughput="", more=()) -> list:
    """The ``vllm_roles.py`` command of one reference or consumer instance."""
    cmd = [py, str(ENGINE / "vllm_roles.py"), role_, "--model", str(model), "--images", images,
           "--out", str(out), "--connector", connector, "--max-tokens", "1", *more, *ROLE_ARGS]
    for flag, value in (("--encoder", encoder), ("--storage", storage), ("--throughput", throughput)):
        if value:
            cmd += [flag, value]
    if extra:
        cmd += ["--extra", json.dumps(extra)]
    return cmd


def role(py, work: Path, model: Path, name: str, role_: str, images: str, connector: str, *,
         encoder="", storage="", extra=None, timeout=1800, throughput="") -> dict:
    out = work / f"{name}.json"
    cmd = role_cmd(py, model, out, role_, images, connector, encoder=encoder, storage=storage, extra=extra,
                   throughput=throughput)
    p, f = _run(cmd, work / f"{name}.log", timeout)
    try:
        rc = p.wait(timeout)
    finally:
        _stop(p, f)
    if rc != 0:
        raise RuntimeError(f"{name} exited {rc}; see {work / (name + '.log')}")
    return json.loads(out.read_text())


def producer(py, work: Path, model: Path, connector: str, images: str, name: str, storage: str = "",
             extra=None, throughput: str = "", wait: bool = True):
    """A producer instance that has encoded ``images`` (and the throughput sets') and serves
    until its stdin closes (``wait=False``: started; :func:`ready` waits for it)."""
    encoder = f"tcp://127.0.0.1:{_port()}"
    out = work / f"{name}.json"
    cmd = [py, str(ENGINE / "vllm_roles.py"), "producer", "--model", str(model), "--images", images,
           "--out", str(out), "--connector", connector, "--encoder", encoder, "--storage",
           storage or str(work / f"{name}-storage"), "--batch", "--extra", json.dumps(extra or {}), *ROLE_ARGS]
    if throughput:
        cmd += ["--throughput", throughput]
    p, f = _run(cmd, work / f"{name}.log", 1800, stdin=subprocess.PIPE)
    if wait:
        ready(p, f, work / f"{name}.log")
    return encoder, p, f


def ready(p, f, log: Path, timeout: float = 1800) -> None:
    """Until the producer whose log is ``log`` printed READY (stopped if it does not)."""
    deadline = time.monotonic() + timeout
    while "READY" not in log.read_text(errors="replace"):
        if p.poll() is not None or time.monotonic() > deadline:
            _stop(p, f)
            raise RuntimeError(f"the producer instance of {log.name} did not come up; see {log}")
        time.sleep(0.5)


def close(p, f) -> None:
    try:
        p.stdin.close()
        p.wait(60)
    except Exception:
        pass
    _stop(p, f)


#: embresume's options in the benchmark (--model wide: the landing region holds 32 items of 16 MiB)
EMBRESUME_EXTRA: dict = {}


def pair(py, work: Path, model: Path, connector: str, images: str, storage: str = "", label: str = "",
         throughput: str = "") -> dict:
    label = label or connector
    storage = storage or str(work / f"{label}-storage")
    extra = {} if connector == "example" else dict(EMBRESUME_EXTRA)
    encoder, p, f = producer(py, work, model, connector, images, f"{label}-producer", storage, extra, throughput)
    try:
        return role(py, work, model, f"{label}-consumer", "consumer", images, connector,
                    encoder=encoder, storage=storage, extra=extra, throughput=throughput)
    finally:
        close(p, f)


class Stepped:
    """A reference or consumer instance driven request by request (``vllm_roles.py
    --stepwise``): :meth:`step` makes its next request and returns when it is answered, so a
    driver can interleave instances and every path sees the same drift of the machine's load."""

    def __init__(self, py, work: Path, model: Path, name: str, role_: str, images: str, connector: str, *,
                 encoder: str = "", storage: str = "", extra=None, throughput: str = ""):
        self.name, self.out, self.log = name, work / f"{name}.json", work / f"{name}.log"
        cmd = role_cmd(py, model, self.out, role_, images, connector, encoder=encoder, storage=storage,
                       extra=extra, throughput=throughput, more=("--stepwise",))
        self.p, self.f = _run(cmd, self.log, 0, stdin=subprocess.PIPE)
        self.k, self._at = 0, 0

    def wait_for(self, text: str, timeout: float) -> None:
        """Until ``text`` appears in the log past what an earlier wait consumed."""
        want, deadline = text.encode(), time.monotonic() + timeout
        while True:
            with open(self.log, "rb") as f:
                f.seek(self._at)
                data = f.read()
            i = data.find(want)
            if i >= 0:
                self._at += i + len(want)
                return
            self._at += max(0, len(data) - len(want))
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.p.returncode}); see {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no {text.strip()!r} within {timeout:.0f} s; see {self.log}")
            time.sleep(0.01)

    def step(self, timeout: float = 900) -> None:
        self.p.stdin.write(b"go\n")
        self.p.stdin.flush()
        self.wait_for(f"STEP {self.k}\n", timeout)
        self.k += 1

    def finish(self, timeout: float = 300) -> dict:
        try:
            self.p.stdin.close()
            rc = self.p.wait(timeout)
        finally:
            _stop(self.p, self.f)
        if rc != 0:
            raise RuntimeError(f"{self.name} exited {rc}; see {self.log}")
        return json.loads(self.out.read_text())

    def kill(self) -> None:
        _stop(self.p, self.f)


def interleaved(py, work: Path, model: Path, images: str, steps: int, throughput: str, tmpfs: Path) -> dict:
    """Every path at once: the three producers encode every image, then the single instance
    and the three consumers make their requests in turn, request by request (the order
    rotates each step), so a change of the machine's load falls on all of them alike."""
    paths = (("EmbresumeECConnector", "embresume", "embresume", ""),
             ("ECExampleConnector (tmpfs)", "example", "example-tmpfs", str(tmpfs)),
             ("ECExampleConnector (disk)", "example", "example-disk", str(work / "example-disk-storage")))
    producers, roles = [], {}
    try:
        for _, connector, label, storage in paths:
            extra = {} if connector == "example" else dict(EMBRESUME_EXTRA)
            producers.append(producer(py, work, model, connector, images, f"{label}-producer",
                                      storage or str(work / f"{label}-storage"), extra, throughput, wait=False))
        for (_, _, label, _), (_, p, f) in zip(paths, producers):        # they encode at the same time
            ready(p, f, work / f"{label}-producer.log")
        roles["single instance"] = Stepped(py, work, model, "reference", "reference", images, "embresume",
                                           throughput=throughput)
        for (title, connector, label, storage), (encoder, _, _) in zip(paths, producers):
            extra = {} if connector == "example" else dict(EMBRESUME_EXTRA)
            roles[title] = Stepped(py, work, model, f"{label}-consumer", "consumer", images, connector,
                                   encoder=encoder, storage=storage or str(work / f"{label}-storage"),
                                   extra=extra, throughput=throughput)
        for r in roles.values():
            r.wait_for("READY\n", 900)
        order = list(roles.values())
        for k in range(steps):
            j = k % len(order)
            for r in order[j:] + order[:j]:
                r.step()
        return {title: r.finish() for title, r in roles.items()}
    finally:
        for r in roles.values():
            r.kill()
        for _, p, f in producers:
            close(p, f)


def memcpy_ms(nbytes: int, repeat: int = 20, arena: int = 256 << 20) -> float:
    """p50 of one single-threaded copy of ``nbytes`` between two host buffers, in this
    process, each copy from and to memory no cache holds (rotating through two arenas of
    ``arena`` bytes): what moving an item's bytes once costs, the floor of any transfer."""
    import numpy as np
    n = max(arena // nbytes, 2)
    src = np.ones(n * nbytes, dtype=np.uint8)
    dst = np.full(n * nbytes, 2, dtype=np.uint8)          # written once: no page is faulted in while timed
    times = []
    for i in range(repeat):
        k = (i % n) * nbytes
        t = time.perf_counter()
        np.copyto(dst[k:k + nbytes], src[k:k + nbytes])
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m embresume.bench.vllm_engine", description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=60, help="images per run (default 60)")
    ap.add_argument("--out", default="bench-results/vllm-engine", help="folder for JSON and logs")
    ap.add_argument("--model", choices=["tiny", "wide"], default="tiny",
                    help="tiny: the 128-wide Qwen2-VL (default); wide: the 3584-wide Qwen2.5-VL, 2 and 16 MiB items")
    ap.add_argument("--concurrency", default="",
                    help="--model wide: throughput at these numbers of requests at once, per image size "
                         "(default 1,8,32; 'none': skip)")
    ap.add_argument("--sequential", dest="interleave", action="store_false",
                    help="--model wide: run the paths one after the other (the single instance beside an idle "
                         "instance) instead of all at once, request by request")
    args = ap.parse_args(argv)
    if args.images < 1:
        ap.error("--images must be at least 1")
    py = _python()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vllm-bench-", dir=out))
    wide = args.model == "wide"
    sizes = WIDE_SIZES if wide else SIZES
    if wide:
        model = work / "tiny-wide-qwen2_5_vl"
        make = [py, str(ENGINE / "make_tiny_wide.py"), "qwen2_5_vl", str(model)]
        ROLE_ARGS[:] = ["--max-model-len", "4096", "--dtype", "bfloat16"]
    else:
        model = work / "tiny-qwen2-vl"
        make = [py, str(ENGINE / "make_tiny_qwen2vl.py"), str(model)]
    subprocess.run(make, check=True, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    # the first image warms the engine up and is not counted; then the sizes alternate
    specs = [f"{sizes[0]}:999"] + [f"{sizes[i % len(sizes)]}:{1000 + i}" for i in range(args.images)]
    images = ",".join(specs)
    # throughput sets (--model wide): per image size and concurrency N, max(N, 4) new images
    # submitted N at a time; "N=SPEC" joined by ';' (vllm_roles.py --throughput)
    conc = [] if not wide or args.concurrency == "none" else \
        [int(x) for x in (args.concurrency or "1,8,32").split(",") if x.strip()]
    tput_sets = [(size, n, [f"{size}:{5000 + 100 * n + 10000 * j + i}" for i in range(max(n, 4))])
                 for j, size in enumerate(sizes) for n in conc]
    throughput = ";".join(f"{n}={','.join(sp)}" for _, n, sp in tput_sets)
    t0 = time.monotonic()
    if wide and args.interleave:
        EMBRESUME_EXTRA.update(landing_bytes="1GiB")
        tmpfs = Path(tempfile.mkdtemp(prefix="embresume-ec-", dir="/dev/shm"))
        try:
            results = interleaved(py, work, model, images, len(specs) + len(tput_sets), throughput, tmpfs)
        finally:
            subprocess.run(["rm", "-rf", str(tmpfs)], check=False)
    elif wide:
        EMBRESUME_EXTRA.update(landing_bytes="1GiB")
        # the single instance shares the machine with an idle second instance, as every pair does
        _, idle_p, idle_f = producer(py, work, model, "embresume", f"{sizes[0]}:1", "idle-neighbour")
        try:
            results = {"single instance": role(py, work, model, "reference", "reference", images, "embresume",
                                               throughput=throughput)}
        finally:
            close(idle_p, idle_f)
        tmpfs = Path(tempfile.mkdtemp(prefix="embresume-ec-", dir="/dev/shm"))
        try:
            results["EmbresumeECConnector"] = pair(py, work, model, "embresume", images, throughput=throughput)
            results["ECExampleConnector (tmpfs)"] = pair(py, work, model, "example", images, str(tmpfs),
                                                         label="example-tmpfs", throughput=throughput)
        finally:
            subprocess.run(["rm", "-rf", str(tmpfs)], check=False)
        results["ECExampleConnector (disk)"] = pair(py, work, model, "example", images, label="example-disk",
                                                    throughput=throughput)
    else:
        results = {"single instance": role(py, work, model, "reference", "reference", images, "embresume")}
        for connector, label in (("embresume", "EmbresumeECConnector"), ("example", "ECExampleConnector (disk)")):
            results[label] = pair(py, work, model, connector, images)
    ref = results["single instance"]["tokens"]
    rows = []
    size_of = [int(sp.split(":")[0]) for sp in specs]
    for label, r in results.items():
        lat = [1e3 * x for x in r["latency_s"][1:]]          # the first request warms the engine up
        row = {"path": label, "images": len(lat), "same tokens": r["tokens"] == ref,
               "ttft_ms_p50": round(statistics.median(lat), 1), "ttft_ms_p99": round(_q(lat, 0.99), 1)}
        if wide:
            for size in sizes:
                by = [x for x, sz in zip(lat, size_of[1:]) if sz == size]
                if by:
                    row[f"ttft_ms_p50_{size}px"] = round(statistics.median(by), 1)
                    row[f"ttft_ms_p99_{size}px"] = round(_q(by, 0.99), 1)
        ref_tput = results["single instance"].get("throughput") or []
        for k, (size, n, _) in enumerate(tput_sets):
            got = (r.get("throughput") or [])[k] if k < len(r.get("throughput") or []) else None
            if got is not None:
                row[f"images_per_s_{size}px_x{n}"] = round(got["images_per_s"], 2)
                if k < len(ref_tput) and got["tokens"] != ref_tput[k]["tokens"]:
                    row["same tokens"] = False
        per_item = r.get("transfer_s") or []
        if wide and per_item:
            for size in sizes:
                by = [1e3 * x for x, sz in zip(per_item[1:], size_of[1:]) if sz == size and x is not None]
                if by:
                    row[f"transfer_ms_p50_{size}px"] = round(statistics.median(by), 2)
                    row[f"transfer_ms_max_{size}px"] = round(max(by), 2)
        counters = r.get("embresume") or {}
        hist = counters.get("transfer_seconds") if isinstance(counters.get("transfer_seconds"), dict) else None
        if hist and hist.get("count"):
            row["transfer_ms_mean"] = round(1e3 * hist["sum"] / hist["count"], 2)
            row["transfer_ms_p50_le"] = round(1e3 * _hist_q(hist, 0.5), 2)
            row["transfer_ms_p99_le"] = round(1e3 * _hist_q(hist, 0.99), 2)
            row["items_received"] = counters.get("items_received")
            row["local_encodes"] = counters.get("local_encodes")
        rows.append(row)
    report = {"machine": f"{os.cpu_count()} CPUs", "model": args.model, "images": args.images, "sizes_px": sizes,
              "seconds": round(time.monotonic() - t0, 1), "rows": rows}
    if wide:
        single = rows[0]
        for row in rows[1:]:
            for size in sizes:
                k = f"ttft_ms_p50_{size}px"
                if k in row and k in single:
                    row[f"overhead_ms_p50_{size}px"] = round(row[k] - single[k], 1)
        report["memcpy_ms_p50"] = {f"{size}px": round(memcpy_ms(WIDE_TOKENS[size] * WIDE_WIDTH * 2), 3)
                                   for size in sizes}
    (out / "vllm_engine.json").write_text(json.dumps(report, indent=1))
    print(f"{'path':28} {'tokens':>6} {'TTFT p50':>9} {'p99':>8} {'xfer p50':>9} {'p99':>8}  (ms)")
    for r in rows:
        print(f"{r['path'][:28]:28} {'same' if r['same tokens'] else 'DIFF':>6} {r['ttft_ms_p50']:>9} "
              f"{r['ttft_ms_p99']:>8} {r.get('transfer_ms_p50_le', '-'):>9} {r.get('transfer_ms_p99_le', '-'):>8}")
    if wide:
        print("per image size, TTFT p50 (overhead over the single instance), ms; memcpy of the item's bytes: "
              + ", ".join(f"{k} {v} ms" for k, v in report["memcpy_ms_p50"].items()))
        for r in rows:
            print(f"  {r['path'][:28]:28} " + "  ".join(
                f"{size}px {r.get(f'ttft_ms_p50_{size}px', '-')} ({r.get(f'overhead_ms_p50_{size}px', '-')})"
                for size in sizes))
        print("per-item transfer (request to landed, one request at a time), p50 / max ms: " + "; ".join(
            f"{r['path']}: " + ", ".join(f"{size}px {r.get(f'transfer_ms_p50_{size}px', '-')} / "
                                         f"{r.get(f'transfer_ms_max_{size}px', '-')}" for size in sizes)
            for r in rows if any(f"transfer_ms_p50_{size}px" in r for size in sizes)))
        if tput_sets:
            print("throughput, images per second (requests at once):")
            for r in rows:
                print(f"  {r['path'][:28]:28} " + "  ".join(
                    f"{size}px x{n} {r.get(f'images_per_s_{size}px_x{n}', '-')}" for size, n, _ in tput_sets))
    print(f"written: {out / 'vllm_engine.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
