"""Topology and size-hint benchmarks.

* :func:`run_fan_in` -- M encoder processes feeding ONE language endpoint (one
  receive pool) against one encoder, same workload, same run: throughput and
  latency (shm by default).
* :func:`run_hints` -- one seeded workload of image sizes (Qwen2-VL token
  counts of random image sizes), received three ways: the default allocation,
  exact hints (:mod:`embresume.hints`) and hints 20 % low; resume rate and
  allocated-but-unfilled tokens, from the endpoint's own counters.

``python -m embresume.bench.bench_topology`` prints both tables.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Optional

from ..config import Config
from ..harness import EncoderProcess, free_port
from ..hints import qwen2_vl_image_tokens
from ..language import LanguageEndpoint
from ..status import Status
from ..synthetic import SyntheticData


def _percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def image_workload(n: int, seed: int = 0, max_side: int = 2048) -> list[tuple[int, int, int]]:
    """``n`` (height, width, tokens) of images with random sizes (seeded)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        h, w = rng.randint(200, max_side), rng.randint(200, max_side)
        out.append((h, w, qwen2_vl_image_tokens(h, w)))
    return out


def _config(transport: str, hidden: int, **kw) -> Config:
    base = dict(hidden_size=hidden, dtype="bf16", transport=transport, default_allocate_tokens=1024,
                pool_blocks=256, prefault=True, request_timeout=120.0,
                encoder_endpoint=f"tcp://127.0.0.1:{free_port()}")
    base.update(kw)
    return Config(**base)


def run_fan_in(encoders=(1, 4), requests: int = 200, inflight: int = 16, hidden: int = 1024,
               transport: str = "shm", seed: int = 0) -> list[dict]:
    """The same workload through 1 encoder and through M encoders into one language endpoint."""
    sizes = [t for _, _, t in image_workload(requests, seed)]
    max_tokens = max(sizes)
    rows = []
    for m in encoders:
        cfgs = [_config(transport, hidden) for _ in range(m)]
        spec = (hidden, "bf16", max_tokens, seed)
        data = SyntheticData(*spec)
        procs = []
        try:
            for c in cfgs:
                procs.append(EncoderProcess(c, data_spec=spec))
            with LanguageEndpoint(cfgs[0], connect=False) as lang:
                for p in procs:
                    lang.connect(p.address)
                lat, nbytes, bad, verify_s = [], 0, 0, 0.0
                todo = list(enumerate(sizes))
                pending: dict = {}
                t0 = time.perf_counter()
                while todo or pending:
                    while todo and len(pending) < inflight:
                        room, tokens = todo.pop(0)
                        p = procs[room % m]
                        lang.request(room, encoder=p.address)
                        p.send(room, tokens)
                        pending[room] = (tokens, time.perf_counter())
                    room = next(iter(pending))
                    st = lang.wait(room, 120)
                    tokens, ts = pending.pop(room)
                    if st is not Status.Success:
                        bad += 1
                        lang.result(room) if st is Status.Failed else None
                        continue
                    lat.append(time.perf_counter() - ts)
                    res = lang.result(room)
                    nbytes += res.embeddings.numel() * res.embeddings.element_size()
                    tv = time.perf_counter()
                    bad += 0 if (res.total_tokens == tokens and data.verify(room, res)) else 1
                    verify_s += time.perf_counter() - tv
                    res.release()
                elapsed = time.perf_counter() - t0 - verify_s     # verification is not transfer time
            rows.append({"encoders": m, "requests": requests, "inflight": inflight, "hidden": hidden,
                         "transport": transport, "gbps": nbytes / elapsed / 1e9,
                         "p50_ms": statistics.median(lat) * 1e3 if lat else float("nan"),
                         "p99_ms": _percentile(lat, 0.99) * 1e3, "failed_or_wrong": bad,
                         "seconds": elapsed})
        finally:
            for p in procs:
                p.close()
    return rows


def run_hints(requests: int = 300, hidden: int = 256, seed: int = 0, low: float = 0.8) -> list[dict]:
    """Resume rate and wasted allocated tokens for default / exact / low hints (in one process)."""
    from ..encoder import EncoderEndpoint

    work = image_workload(requests, seed)
    max_tokens = max(t for _, _, t in work)
    data = SyntheticData(hidden, "bf16", max_tokens, seed)
    rows = []
    for mode in ("default allocation", "exact hint", f"hint {round((1 - low) * 100)}% low"):
        cfg = _config("shm", hidden, pool_blocks=max(64, 2 * -(-max_tokens // 128)), prefault=False)
        with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as lang:
            resumed = 0
            for room, (_, _, tokens) in enumerate(work):
                hint = None if mode.startswith("default") else (tokens if mode.startswith("exact")
                                                                else max(1, int(tokens * low)))
                lang.request(room, expected_tokens=hint)
                e, f, m, d = data.sample(room, tokens)
                enc.send_tensors(room, e, f, m, d)
                res = lang.recv(room, timeout=60)
                assert res.total_tokens == tokens
                resumed += res.resumes > 0
                res.release()
            total = sum(t for _, _, t in work)
            rows.append({"mode": mode, "requests": requests, "resume_rate": resumed / requests,
                         "resumes": lang.stats["resumes"], "wasted_tokens": lang.stats["wasted_tokens"],
                         "wasted_pct": 100.0 * lang.stats["wasted_tokens"] / total, "tokens": total})
    return rows


def format_fan_in(rows: list[dict]) -> str:
    base = next((r for r in rows if r["encoders"] == 1), None)
    lines = ["| encoders -> 1 language endpoint | GB/s | vs 1:1 | p50 ms | p99 ms | failed |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = r["gbps"] / base["gbps"] if base and base["gbps"] else float("nan")
        lines.append(f"| {r['encoders']}:1 ({r['transport']}) | {r['gbps']:.2f} | {ratio:.2f}x | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['failed_or_wrong']} |")
    return "\n".join(lines)


def format_hints(rows: list[dict]) -> str:
    lines = ["| allocation | requests resumed | resumes | allocated, unfilled tokens |",
             "| --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['mode']} | {100 * r['resume_rate']:.1f}% | {r['resumes']} | "
                     f"{r['wasted_tokens']} ({r['wasted_pct']:.1f}% of {r['tokens']}) |")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m embresume.bench.bench_topology", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--encoders", type=int, default=4)
    p.add_argument("--json", default=None, help="write the rows to this file")
    a = p.parse_args(argv)
    fan = run_fan_in((1, a.encoders), a.requests)
    hints = run_hints(a.requests)
    print(format_fan_in(fan))
    print()
    print(format_hints(hints))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"fan_in": fan, "hints": hints}, f, indent=1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
