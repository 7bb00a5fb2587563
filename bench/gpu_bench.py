"""GPU scatter benchmark (same-host GPU path).

For each chunk size (default 1,024 / 8,192 / 32,768 tokens of 128-token
blocks, hidden 4096, bf16, random destination block order) it measures, on
one GPU:

* ``d2d``: a torch device-to-device copy of the same bytes (the roofline);
* ``fused``: the one-launch CuPy block-scatter kernel of
  :mod:`embresume.kernels.cuda` into a pool of **another process** opened
  through CUDA IPC (or, where CUDA IPC is unavailable, a pool of this process:
  the output says which);
* ``memcpy``: one ``cudaMemcpyAsync`` per block (embeddings only);
* ``fancy``: CuPy fancy-index assignment ``pool[idx] = src`` (embeddings only).

Bandwidth is bytes read + written per second (as DESIGN.md's figures), from
CUDA events around back-to-back iterations queued behind a GPU sleep, so
host launch overhead is excluded from the GPU time; the fused kernel's full
host call time (descriptor building + H2D + launch) is reported separately.

Usage::

    python -m embresume.bench.gpu_bench --out results.json

Importing this module needs neither CuPy nor a GPU; running it does.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import time
import traceback
from typing import Optional


def _fail(msg: str) -> int:
    print(f"gpu_bench: {msg}", file=sys.stderr, flush=True)
    return 2


def _print(*a) -> None:
    print(*a, flush=True)


# ---------------------------------------------------------------------------
# the language process owning the pool
# ---------------------------------------------------------------------------
def _language_child(conn, layout_dict: dict, max_wait_s: float) -> None:
    from embresume.procutil import die_with_parent
    die_with_parent()
    try:
        import torch
        from embresume.blocks import BlockLayout
        from embresume.ipc.cuda_ipc import CudaBacking
        from embresume.transport.cuda_ipc import CudaIpcTransport

        torch.cuda.set_device(0)
        layout = BlockLayout.from_dict(layout_dict)
        pool = CudaBacking.create_pool(layout)
        t = CudaIpcTransport()
        conn.send(("desc", t.export_pool(pool)))
        deadline = time.monotonic() + max_wait_s
        while time.monotonic() < deadline:
            if conn.poll(1.0):
                msg = conn.recv()
                if msg[0] == "stop":
                    break
        t.unexport_pool(pool)
        pool.close()
        conn.send(("stopped",))
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------
class Timer:
    """GPU time per iteration of ``fn`` on the current stream, with the
    iterations queued behind ``torch.cuda._sleep`` so that launch overhead is
    hidden."""

    def __init__(self, torch):
        self.torch = torch
        # calibrate the sleep kernel: GPU cycles per second
        cycles = 20_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)
        torch.cuda.synchronize()
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        self.cycles_per_s = cycles / max(1e-6, start.elapsed_time(end) / 1e3)

    def gpu_time(self, fn, iters: int, warmup: int = 3) -> tuple[float, float]:
        torch = self.torch
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        one = time.perf_counter() - t0                    # host + GPU time of one call
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        enq = (time.perf_counter() - t0) / 3               # host enqueue time per call
        torch.cuda.synchronize()
        sleep_s = min(0.5, 1.5 * iters * enq + 1e-3)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(sleep_s * self.cycles_per_s))
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters, one


def run(args) -> dict:
    import numpy as np
    import torch

    try:
        import cupy
    except Exception as e:
        raise SystemExit(_fail(f"needs CuPy ({type(e).__name__}: {e})"))
    if not torch.cuda.is_available():
        raise SystemExit(_fail("needs a CUDA GPU (torch sees none)"))

    from embresume.blocks import BlockLayout
    from embresume.ipc.cuda_ipc import CudaBacking, CudaIpcUnavailable
    from embresume.transport.cuda_ipc import CudaIpcTransport
    from embresume.kernels import cuda as kcuda
    from embresume.source import TensorSource

    torch.cuda.set_device(0)
    dev = 0
    name = torch.cuda.get_device_name(dev)
    timer = Timer(torch)
    bs, H, dtype = args.block_size, args.hidden, torch.bfloat16
    max_tokens = max(args.tokens)
    num_blocks = 2 * (-(-max_tokens // bs))
    layout = BlockLayout(num_blocks, bs, H, dtype)
    _print(f"device: {name}; torch {torch.__version__}, cupy {cupy.__version__}; "
           f"pool {num_blocks} blocks x {bs} tokens x {H} ({layout.nbytes / 2**20:.0f} MiB)")

    # -- the destination pool: another process's, through CUDA IPC ------------
    proc = conn = None
    peer = transport = local_pool = None
    target = None
    if not args.same_process:
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_language_child, args=(child, layout.to_dict(), args.child_wait), daemon=True)
        proc.start()
        child.close()
        try:
            if not conn.poll(args.child_timeout):
                raise CudaIpcUnavailable(f"the pool process sent no description within {args.child_timeout} s")
            msg = conn.recv()
            if msg[0] != "desc":
                raise CudaIpcUnavailable(f"the pool process failed: {msg[1] if len(msg) > 1 else msg}")
            transport = CudaIpcTransport(device=dev)
            t0 = time.perf_counter()
            peer = transport.open_peer(msg[1])
            open_ms = (time.perf_counter() - t0) * 1e3
            target = f"pool of another process (pid {msg[1]['pid']}) opened via CUDA IPC in {open_ms:.2f} ms"
        except (CudaIpcUnavailable, EOFError, OSError) as e:
            target = f"same-process pool (CUDA IPC unavailable: {e})"
            peer = None
    if peer is None:
        local_pool = CudaBacking.create_pool(layout, dev)
        if target is None:
            target = "same-process pool (--same-process)"
    pool = peer.pool if peer is not None else local_pool
    _print(f"target: {target}")

    stream = torch.cuda.current_stream(dev)
    cstream = cupy.cuda.ExternalStream(stream.cuda_stream, dev)
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    try:
        for n in args.tokens:
            nb = -(-n // bs)
            emb = torch.randn(n, H, dtype=torch.float32, device="cuda", generator=gen).to(dtype)
            fill = torch.arange(n, dtype=torch.int32, device="cuda")
            mrope = torch.arange(3 * n, dtype=torch.int32, device="cuda").view(3, n)
            src = TensorSource(emb, fill, mrope)
            dst_blocks = random.Random(n).sample(range(num_blocks), nb)
            emb_bytes = n * H * emb.element_size()
            fused_bytes = emb_bytes + n * 4 + 3 * n * 4
            iters = args.iters

            # roofline: the same bytes, one contiguous D2D copy
            d2d_dst = torch.empty_like(emb)
            t_d2d, _ = timer.gpu_time(lambda: d2d_dst.copy_(emb), iters)
            del d2d_dst

            # the fused kernel (GPU time of the prepared launch) ...
            launch = kcuda.plan_scatter(pool, dst_blocks, src, 0, n, None)
            desc_dev = torch.from_numpy(launch.desc).to("cuda")
            fn = kcuda._kernel()
            kargs = (np.int64(desc_dev.data_ptr()), np.int32(launch.nrec), np.int32(launch.emb_ctas),
                     np.int64(0), np.int64(0), np.int64(0))

            def fused():
                fn((launch.grid,), (kcuda.THREADS,), kargs, stream=cstream)
            t_fused, _ = timer.gpu_time(fused, iters)
            # ... and the whole host call (plan + one H2D copy + launch), synchronised
            t_call, one_call = timer.gpu_time(lambda: kcuda.scatter_chunk(pool, dst_blocks, src, 0, n, None),
                                              max(5, iters // 4))
            torch.cuda.synchronize()
            idx = torch.tensor(dst_blocks, device="cuda")
            ok = (torch.equal(pool.embeddings[idx].reshape(-1, H)[:n].view(torch.int16), emb.view(torch.int16))
                  and torch.equal(pool.fill_ids[idx].reshape(-1)[:n], fill)
                  and torch.equal(pool.mrope[idx].permute(1, 0, 2).reshape(3, -1)[:, :n], mrope))

            # one cudaMemcpyAsync per block (embeddings)
            rt = cupy.cuda.runtime
            dst_base = pool.embeddings.data_ptr()
            src_base = emb.data_ptr()
            blk = bs * H * emb.element_size()
            copies = [(dst_base + b * blk, src_base + j * blk, min(blk, emb_bytes - j * blk))
                      for j, b in enumerate(dst_blocks)]
            sptr = stream.cuda_stream

            def memcpy_loop():
                for d, s, c in copies:
                    rt.memcpyAsync(d, s, c, rt.memcpyDeviceToDevice, sptr)
            # (about 1,000 launches can be queued; beyond that the loop is host-bound anyway)
            t_memcpy, _ = timer.gpu_time(memcpy_loop, max(2, min(iters // 4, 2048 // nb)))

            # CuPy fancy indexing (embeddings; full blocks only, as uint16 bytes)
            nfull = n // bs
            if nfull:
                with cstream:
                    dst_cp = cupy.asarray(pool.embeddings.view(torch.int16)).reshape(num_blocks, bs * H)
                    src_cp = cupy.asarray(emb[:nfull * bs].view(torch.int16)).reshape(nfull, bs * H)
                    idx_cp = cupy.asarray(np.asarray(dst_blocks[:nfull], dtype=np.int64))

                def fancy():
                    with cstream:
                        dst_cp[idx_cp] = src_cp
                t_fancy, _ = timer.gpu_time(fancy, max(3, iters // 4))
                fancy_bytes = nfull * blk
            else:
                t_fancy, fancy_bytes = float("nan"), 0

            def tbps(nbytes, t):
                return 2 * nbytes / t / 1e12 if t and t > 0 else float("nan")
            d2d = tbps(emb_bytes, t_d2d)
            row = {
                "tokens": n, "blocks": nb, "emb_bytes": emb_bytes,
                "d2d_us": t_d2d * 1e6, "d2d_tbps": d2d,
                "fused_us": t_fused * 1e6, "fused_tbps": tbps(fused_bytes, t_fused),
                "fused_call_us": one_call * 1e6, "fused_correct": bool(ok),
                "memcpy_us": t_memcpy * 1e6, "memcpy_tbps": tbps(emb_bytes, t_memcpy),
                "fancy_us": t_fancy * 1e6, "fancy_tbps": tbps(fancy_bytes, t_fancy),
            }
            for k in ("fused", "memcpy", "fancy"):
                row[f"{k}_ratio"] = row[f"{k}_tbps"] / d2d if d2d == d2d and d2d > 0 else float("nan")
            rows.append(row)
            _print(f"  {n:>6} tokens: d2d {row['d2d_tbps']:.2f} TB/s | fused {row['fused_tbps']:.2f} TB/s "
                   f"({row['fused_us']:.1f} us, call {row['fused_call_us']:.0f} us, "
                   f"{'correct' if ok else 'WRONG'}) | memcpy {row['memcpy_tbps']:.2f} | "
                   f"fancy {row['fancy_tbps']:.2f}")
            del launch, desc_dev, emb, src
    finally:
        if peer is not None:
            transport.close_peer(peer)
            transport.close()
        if local_pool is not None:
            local_pool.close()
        if proc is not None:
            try:
                conn.send(("stop",))
                if conn.poll(30):
                    conn.recv()
            except (OSError, EOFError):
                pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
            conn.close()

    return {"device": name, "torch": torch.__version__, "cupy": cupy.__version__, "target": target,
            "block_size": bs, "hidden": H, "dtype": "bfloat16", "iters": args.iters,
            "bandwidth": "bytes read + written per second", "rows": rows}


def print_table(res: dict) -> None:
    _print(f"\n{res['device']}  target: {res['target']}")
    hdr = (f"{'tokens':>7} | {'D2D copy':>16} | {'fused kernel':>24} | {'per-block memcpy':>20} | "
           f"{'cupy fancy idx':>20}")
    _print(hdr)
    _print("-" * len(hdr))
    for r in res["rows"]:
        _print(f"{r['tokens']:>7} | {r['d2d_tbps']:6.2f} TB/s {r['d2d_us']:5.0f}us | "
               f"{r['fused_tbps']:6.2f} TB/s x{r['fused_ratio']:.2f} {r['fused_us']:6.1f}us | "
               f"{r['memcpy_tbps']:6.2f} TB/s x{r['memcpy_ratio']:.2f} | "
               f"{r['fancy_tbps']:6.2f} TB/s x{r['fancy_ratio']:.2f}")
    _print("(TB/s = bytes read + written; xN = ratio to the D2D copy; fused us = GPU time of one launch)")


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m embresume.bench.gpu_bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write the results as JSON to this path")
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 8192, 32768],
                   help="comma-separated chunk sizes in tokens (default 1024,8192,32768)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--same-process", action="store_true", help="skip CUDA IPC; scatter into a local pool")
    p.add_argument("--child-timeout", type=float, default=120.0, help="seconds to wait for the pool process")
    p.add_argument("--child-wait", type=float, default=600.0, help="seconds the pool process stays up at most")
    args = p.parse_args(argv)
    try:
        import torch  # noqa: F401
    except Exception as e:  # pragma: no cover
        return _fail(f"needs torch ({e})")
    try:
        res = run(args)
    except SystemExit as e:
        return int(e.code or 0)
    print_table(res)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
        _print(f"wrote {args.out}")
    return 0 if all(r["fused_correct"] for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
