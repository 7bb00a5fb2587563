"""Benchmark inside a real vLLM: EmbresumeECConnector against vLLM's ECExampleConnector.

    python -m embresume.bench.vllm_engine [--images 60] [--out DIR]

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


def role(py, work: Path, model: Path, name: str, role_: str, images: str, connector: str, *,
         encoder="", storage="", extra=None, timeout=900) -> dict:
    out = work / f"{name}.json"
    cmd = [py, str(ENGINE / "vllm_roles.py"), role_, "--model", str(model), "--images", images,
           "--out", str(out), "--connector", connector, "--max-tokens", "1"]
    if encoder:
        cmd += ["--encoder", encoder]
    if storage:
        cmd += ["--storage", storage]
    if extra:
        cmd += ["--extra", json.dumps(extra)]
    p, f = _run(cmd, work / f"{name}.log", timeout)
    try:
        rc = p.wait(timeout)
    finally:
        _stop(p, f)
    if rc != 0:
        raise RuntimeError(f"{name} exited {rc}; see {work / (name + '.log')}")
    return json.loads(out.read_text())


def pair(py, work: Path, model: Path, connector: str, images: str) -> dict:
    encoder = f"tcp://127.0.0.1:{_port()}"
    storage = str(work / f"{connector}-storage")
    extra = {} if connector == "example" else {"peer_timeout": 30, "handshake_timeout": 30}
    out = work / f"{connector}-producer.json"
    cmd = [py, str(ENGINE / "vllm_roles.py"), "producer", "--model", str(model), "--images", images,
           "--out", str(out), "--connector", connector, "--encoder", encoder, "--storage", storage, "--batch",
           "--extra", json.dumps(extra)]
    p, f = _run(cmd, work / f"{connector}-producer.log", 900, stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 900
        while "READY" not in (work / f"{connector}-producer.log").read_text(errors="replace"):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {connector} producer did not come up; see its log in {work}")
            time.sleep(0.5)
        return role(py, work, model, f"{connector}-consumer", "consumer", images, connector,
                    encoder=encoder, storage=storage, extra=extra)
    finally:
        try:
            p.stdin.close()
            p.wait(60)
        except Exception:
            pass
        _stop(p, f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m embresume.bench.vllm_engine", description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=60, help="images per run (default 60)")
    ap.add_argument("--out", default="bench-results/vllm-engine", help="folder for JSON and logs")
    args = ap.parse_args(argv)
    if args.images < 1:
        ap.error("--images must be at least 1")
    py = _python()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vllm-bench-", dir=out))
    model = work / "tiny-qwen2-vl"
    subprocess.run([py, str(ENGINE / "make_tiny_qwen2vl.py"), str(model)], check=True, env=_env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    images = ",".join(f"{SIZES[i % len(SIZES)]}:{1000 + i}" for i in range(args.images))
    t0 = time.monotonic()
    results = {"single instance": role(py, work, model, "reference", "reference", images, "embresume")}
    for connector, label in (("embresume", "EmbresumeECConnector"), ("example", "ECExampleConnector (disk)")):
        results[label] = pair(py, work, model, connector, images)
    ref = results["single instance"]["tokens"]
    rows = []
    for label, r in results.items():
        lat = [1e3 * x for x in r["latency_s"][1:]]          # the first request warms the engine up
        row = {"path": label, "images": len(r["latency_s"]), "same tokens": r["tokens"] == ref,
               "ttft_ms_p50": round(statistics.median(lat), 1), "ttft_ms_p99": round(_q(lat, 0.99), 1)}
        counters = r.get("embresume") or {}
        hist = counters.get("transfer_seconds") if isinstance(counters.get("transfer_seconds"), dict) else None
        if hist and hist.get("count"):
            row["transfer_ms_mean"] = round(1e3 * hist["sum"] / hist["count"], 2)
            row["transfer_ms_p50_le"] = round(1e3 * _hist_q(hist, 0.5), 2)
            row["transfer_ms_p99_le"] = round(1e3 * _hist_q(hist, 0.99), 2)
            row["items_received"] = counters.get("items_received")
            row["local_encodes"] = counters.get("local_encodes")
        rows.append(row)
    report = {"machine": f"{os.cpu_count()} CPUs", "images": args.images, "sizes_px": SIZES,
              "seconds": round(time.monotonic() - t0, 1), "rows": rows}
    (out / "vllm_engine.json").write_text(json.dumps(report, indent=1))
    print(f"{'path':28} {'tokens':>6} {'TTFT p50':>9} {'p99':>8} {'xfer p50':>9} {'p99':>8}  (ms)")
    for r in rows:
        print(f"{r['path'][:28]:28} {'same' if r['same tokens'] else 'DIFF':>6} {r['ttft_ms_p50']:>9} "
              f"{r['ttft_ms_p99']:>8} {r.get('transfer_ms_p50_le', '-'):>9} {r.get('transfer_ms_p99_le', '-'):>8}")
    print(f"written: {out / 'vllm_engine.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
