"""Where a consumer's time goes inside vLLM: one tiny-model pair per connector, timed in every
process of the engine by ``sitecustomize.py`` (beside this file), then summarised per request.

    python tests/engine/timeline/run.py --images 12            # embresume, then the file connector
    python tests/engine/timeline/run.py --report /tmp/x.embresume   # summarise a probe file again

Per request (the first, which warms the engine up, left out), from ``LLM.generate``'s start:
when the request reaches the engine core (``add_request``), the transfer hop by hop (the
consumer's ``request()`` called, the producer's worker process reading the INIT, its write,
the consumer reading the STATUS), when its item has landed (the connector's ``_landed``),
when the step that runs the model starts and how long it takes, when the worker starts
loading the item, and what follows the step.  The engine runs with vLLM's defaults (separate engine-core and worker
processes), as ``python -m embresume.bench.vllm_engine`` runs it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))           # the checkout, for bench.vllm_engine


def _q(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p * (len(v) - 1))))]


def report(path: Path) -> dict:
    lines = [line.rstrip("\n").split(" ", 3) for line in path.read_text().splitlines(True)]
    ev = [(int(t), pid, e, (d[0] if d else "")) for t, pid, e, *d in lines if e != "patched"]
    gens = [(t, pid, d) for t, pid, e, d in ev if e == "LLM.generate"]
    client = gens[-1][1]                             # the consumer's client (the producer's came first)
    rows = []
    for tend, _, d in [g for g in gens if g[1] == client][1:]:
        t0 = tend - float(d.split("us")[0]) * 1e3
        win = [x for x in ev if t0 <= x[0] <= tend]

        def first(name, has="", start=False):
            # the first such event of the window (ms from t0); start=True: when its call began
            return next(((t - t0) / 1e6 - (float(dd.split("us")[0]) / 1e3 if start else 0)
                         for t, _, e, dd in win if e == name and has in dd), None)
        steps = [(t, float(dd.split("us")[0]) / 1e3) for t, _, e, dd in win
                 if e == "EngineCore.step" and "executed=True" in dd]
        if not steps:
            continue
        end, dur = (steps[0][0] - t0) / 1e6, steps[0][1]
        rows.append({"total": (tend - t0) / 1e6, "to engine core": first("EngineCore.add_request"),
                     # the transfer, hop by hop: request() puts the INIT on the ring, the
                     # producer's worker process reads it and writes, the consumer's scheduler
                     # process reads the STATUS
                     "request() called": first("LanguageEndpoint.request", start=True),
                     "producer reads INIT": first("EncoderEndpoint._on_message", "Init", start=True),
                     "write starts": first("EncoderEndpoint._write", start=True),
                     "write ends": first("EncoderEndpoint._write"),
                     "STATUS read": first("LanguageEndpoint._on_message", "StatusMsg", start=True),
                     "to landed": first("LandingScheduler._landed"),
                     # the worker's load of the item: the model's forward starts right after it
                     "worker loads the item": first("LandingWorker.start_load_caches", start=True),
                     "model step starts": end - dur,
                     "model step": dur, "after the step": (tend - t0) / 1e6 - end})
    out = {}
    print(f"{path.name}: {len(rows)} requests, ms from LLM.generate's start (p50 / max)")
    for r in rows:                      # between consecutive steps, for the hop-by-hop view
        seq = ["to engine core", "request() called", "producer reads INIT", "write starts", "write ends",
               "STATUS read", "to landed", "model step starts"]
        for a, b in zip(seq, seq[1:]):
            r[f"  {a} -> {b}"] = None if r[a] is None or r[b] is None else r[b] - r[a]
    for k in rows[0]:
        v = [r[k] for r in rows if r[k] is not None]
        if v:
            out[k] = (_q(v, .5), max(v))
            print(f"  {k:44s} {out[k][0]:7.2f} / {out[k][1]:7.2f}")
    v = [r["model step starts"] - r["to engine core"] for r in rows]
    out["engine core -> model step"] = (_q(v, .5), max(v))
    print(f"  {'engine core -> model step':44s} {out['engine core -> model step'][0]:7.2f} / {max(v):7.2f}")
    v = [r["worker loads the item"] - r["to engine core"] for r in rows if r["worker loads the item"] is not None]
    if v:
        out["engine core -> worker loads the item"] = (_q(v, .5), max(v))
        print(f"  {'engine core -> worker loads the item':44s} {_q(v, .5):7.2f} / {max(v):7.2f}"
              f"  (mean {sum(v) / len(v):.2f}, n={len(v)})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--connectors", default="embresume,example")
    ap.add_argument("--out", default="", help="directory of the probe files (default: a new temporary one)")
    ap.add_argument("--report", nargs="*", default=None, help="only summarise these probe files")
    args = ap.parse_args(argv)
    if args.report is not None:
        for f in args.report:
            report(Path(f))
        return 0
    import bench.vllm_engine as B
    base = B._env
    out = Path(args.out or tempfile.mkdtemp(prefix="embresume-timeline-"))
    out.mkdir(parents=True, exist_ok=True)
    py = B._python()
    model = out / "tiny-qwen2-vl"
    subprocess.run([py, str(B.ENGINE / "make_tiny_qwen2vl.py"), str(model)], check=True, env=base(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    images = ",".join(["56:999"] + [f"{B.SIZES[i % len(B.SIZES)]}:{1000 + i}" for i in range(args.images)])
    for c in args.connectors.split(","):
        probe = out / f"probe.{c}"
        probe.write_text("")
        B._env = lambda probe=probe: {**base(), "PYTHONPATH": f"{base()['PYTHONPATH']}{os.pathsep}{HERE}",
                                      "EMBRESUME_PROBE": str(probe)}
        try:
            B.pair(py, out, model, c, images)
        finally:
            B._env = base
        report(probe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
