"""Pieces or one piece: ``Config.pipeline_bytes`` against 0 for a zero-copy receiver.

With ``pipeline_bytes`` (default 8 MiB) the encoder writes a chunk of a few
MiB in about four pieces and reports each (PROGRESS), so a receiver that
copies the result out starts while the rest is written.  A receiver that
takes the result as views of its pool (``zero_copy``, or the vLLM consumer's
``load_from_pool``) copies nothing; the reports only wake its threads.

Two pairs run side by side, each an encoder in a spawned child and a language
endpoint in this process (zero-copy receive, shm): one with the default
``pipeline_bytes``, one with 0.  Every item is published before the clock
starts (synthetic data, verified bit-exact on arrival); one sample is
``request()`` to ``recv()`` returned, taking turns between the pairs, the
first of each size left out::

    python -m embresume.bench.pieces_ab [--items 25] [--hidden 3584] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

#: tokens per item: a 1344 px and a 448 px image in Qwen2.5-VL (16.8 and 2.1 MB at 3584 bf16)
SIZES = (2340, 292)


def run(items: int, hidden: int) -> dict:
    import numpy as np
    import torch
    from embresume import Config
    from embresume.harness import EncoderProcess, free_port
    from embresume.language import LanguageEndpoint
    from embresume.synthetic import SyntheticData

    rooms = [(f"{t}-{i}", t) for t in SIZES for i in range(items)]
    alloc = -(-max(SIZES) // 64) * 64
    spec = (hidden, "bf16", 4 * max(SIZES), 0, "cpu")
    data = SyntheticData(*spec)
    pairs = {}
    with contextlib.ExitStack() as stack:
        for name, pb in (("pieces", Config().pipeline_bytes), ("one piece", 0)):
            cfg = Config(hidden_size=hidden, dtype="bf16", block_size=64, default_allocate_tokens=alloc,
                         pool_blocks=4 * alloc // 64, zero_copy=True, pipeline_bytes=pb,
                         encoder_endpoint=f"tcp://127.0.0.1:{free_port()}")
            enc = stack.enter_context(EncoderProcess(cfg, data_spec=spec))
            enc.send_many(rooms)
            enc.stats(timeout=120)                    # answered after every item is published
            pairs[name] = stack.enter_context(LanguageEndpoint(cfg))
        times = {(name, t): [] for name in pairs for t in SIZES}
        for room, tokens in rooms:
            for name, lang in pairs.items():
                t0 = time.perf_counter_ns()
                lang.request(room)
                res = lang.recv(room, timeout=30)
                times[name, tokens].append((time.perf_counter_ns() - t0) / 1e6)
                if not data.verify(room, res):
                    raise RuntimeError(f"{name}: {room} did not come back bit-exact")
                res.release()
                time.sleep(0.02)                      # every thread parked when the next request comes
    src = torch.randn(max(SIZES), hidden).to(torch.bfloat16).view(torch.int16).numpy()
    dst = np.ones_like(src)
    memcpy = {}
    for t in SIZES:
        m = []
        for _ in range(20):
            t0 = time.perf_counter_ns()
            np.copyto(dst[:t], src[:t])
            m.append((time.perf_counter_ns() - t0) / 1e6)
        memcpy[t] = statistics.median(m)
    out = {"hidden": hidden, "items": items, "sizes": {}}
    for t in SIZES:
        row = {"mb": round(t * hidden * 2 / 1e6, 1), "memcpy_ms": round(memcpy[t], 3)}
        for name in pairs:
            v = times[name, t][1:]
            row[name] = {"p50_ms": round(statistics.median(v), 3), "max_ms": round(max(v), 3)}
        out["sizes"][t] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m embresume.bench.pieces_ab", description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=25, help="items per size and pair (default 25)")
    ap.add_argument("--hidden", type=int, default=3584, help="embedding width (default 3584, bf16)")
    ap.add_argument("--json", help="write the result to this file")
    args = ap.parse_args(argv)
    if args.items < 2:
        ap.error("--items must be at least 2")
    res = run(args.items, args.hidden)
    print(f"request -> result, zero-copy receive, {args.items - 1} items per size and pair (ms)")
    for t, row in res["sizes"].items():
        print(f"  {t:5} tokens ({row['mb']} MB): pieces p50 {row['pieces']['p50_ms']:.2f} "
              f"(max {row['pieces']['max_ms']:.2f}), one piece p50 {row['one piece']['p50_ms']:.2f} "
              f"(max {row['one piece']['max_ms']:.2f}); memcpy {row['memcpy_ms']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
