"""Overhead of :class:`MooncakeTransport` over raw Mooncake, loopback TCP.

For each size one chunk of ``tokens`` tokens goes into random (non-contiguous)
destination blocks of an exported pool, in one process with two engines:

* ``raw``: ``batch_transfer_sync_write`` of exactly the triples the transport
  builds, with source and destination registered beforehand -- what a
  hand-written sender would do;
* ``block``: ``write_chunk`` from a :class:`BlockSource` (the encoder's pool);
* ``tensor``: ``write_chunk`` from a :class:`TensorSource` (``tensor_mode=auto``:
  rows registered in place on TCP), compared with its own raw baseline;
* ``stage``: ``write_chunk`` from a TensorSource with ``tensor_mode=stage``
  (one copy into the staging buffer), for the register-vs-copy decision.

Raw and library runs are interleaved (in rotating order) so that drift hits both.  It also reports
the per-engine costs (initialise, register/unregister).  Run::

    python -m embresume.bench.mooncake_bench [--quick] [--tokens 1024,8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Optional, Sequence

import torch

from embresume.blocks import BlockLayout, BlockPool
from embresume.config import parse_dtype
from embresume.planner import plan_chunk
from embresume.source import BlockSource, TensorSource, make_aux
from embresume.kernels.cpu import copy_tensor
from embresume.transport import mooncake as mc

GB = 1e9


def _fill_random(t: torch.Tensor, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    raw = t.view(torch.uint8).view(-1)
    step = 1 << 24
    for i in range(0, raw.numel(), step):
        n = min(step, raw.numel() - i)
        raw[i:i + n].copy_(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def engine_costs(samples: int = 3) -> dict:
    """Initialise fresh engines and time (un)registration of 1/64/256 MiB.
    The engines go to the transport's idle list afterwards (reused, never destroyed)."""
    mod = mc.import_mooncake()
    inits, engines = [], []
    for _ in range(samples):
        te = mod.TransferEngine()
        t = time.perf_counter()
        rc = te.initialize("127.0.0.1", mc.METADATA_SERVER, "tcp", "")
        inits.append(time.perf_counter() - t)
        mc._all_engines.append(te)
        import ctypes
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(te))
        if rc != 0:
            raise RuntimeError(f"initialize failed: {rc}")
        engines.append(te)
    out = {"engine_init_ms": statistics.median(inits) * 1e3}
    te = engines[0]
    buf = torch.empty(256 << 20, dtype=torch.uint8)
    for mib in (1, 64, 256):
        regs, unregs = [], []
        for _ in range(5):
            regs.append(_timed(lambda: te.register_memory(buf.data_ptr(), mib << 20)))
            unregs.append(_timed(lambda: te.unregister_memory(buf.data_ptr())))
        out[f"register_{mib}MiB_us"] = statistics.median(regs) * 1e6
        out[f"unregister_{mib}MiB_us"] = statistics.median(unregs) * 1e6
    for te in engines:
        mc._recycle_engine(("tcp", "", "127.0.0.1"), te)
    return out


def run(tokens_list: Sequence[int] = (1024, 4096, 8192, 32768), hidden: int = 4096,
        dtype: torch.dtype | str = torch.bfloat16, repeats: Optional[int] = None, quick: bool = False,
        block_size: int = 128, seed: int = 0) -> list[dict]:
    """One row per size: median times (ms), GB/s and library/raw ratios."""
    dtype = parse_dtype(dtype)
    if quick:
        tokens_list = [t for t in tokens_list if t <= 4096] or [min(tokens_list)]
        repeats = repeats or 5
    repeats = repeats or 9
    max_tokens = max(tokens_list)
    nblocks = -(-max_tokens // block_size)
    layout = BlockLayout(nblocks, block_size, hidden, dtype)

    dst = BlockPool.create(layout)
    src_pool = BlockPool.create(layout)
    _fill_random(src_pool.backing.raw, seed)
    emb = torch.empty(max_tokens, hidden, dtype=dtype)
    _fill_random(emb, seed + 1)
    fill = torch.arange(max_tokens, dtype=torch.int32)
    mrope = torch.arange(3 * max_tokens, dtype=torch.int32).view(3, max_tokens)

    lang = mc.MooncakeTransport("tcp", "", "127.0.0.1")
    enc = mc.MooncakeTransport("tcp", "", "127.0.0.1")
    enc_stage = mc.MooncakeTransport("tcp", "", "127.0.0.1", tensor_mode="stage")
    rows = []
    try:
        desc = lang.export_pool(dst)
        enc.register_source_pool(src_pool)
        peer = enc.open_peer(desc)
        peer_stage = enc_stage.open_peer(desc)
        g = torch.Generator().manual_seed(seed + 2)
        for T in tokens_list:
            nb = -(-T // block_size)
            dst_blocks = torch.randperm(nblocks, generator=g)[:nb].tolist()
            src_blocks = torch.randperm(nblocks, generator=g)[:nb].tolist()
            plan = plan_chunk(T, 0, nb * block_size, block_size, dst_blocks)
            aux = make_aux(T, 0, layout.aux_ints)
            bsrc = BlockSource(src_pool, src_blocks, T)
            tsrc = TensorSource(emb[:T], fill[:T], mrope[:, :T].contiguous())

            # raw baselines: the very triples the transport builds, registered beforehand
            # (tensor first: it sizes the staging buffer that the block path reuses for aux)
            with peer.engine.lock:
                traw = enc.build_triples(peer, tsrc, plan, aux)   # keeps its transient registration
            with peer.engine.lock:
                braw = enc.build_triples(peer, bsrc, plan, aux)
            te, sess = peer.engine.te, peer.session

            def raw(tr):
                rc = te.batch_transfer_sync_write(sess, tr[0], tr[1], tr[2])
                assert rc == 0, rc

            variants = {
                "raw_block": lambda: raw(braw),
                "lib_block": lambda: enc.write_chunk(peer, bsrc, plan, aux),
                "raw_tensor": lambda: raw(traw),
                "lib_tensor": lambda: enc.write_chunk(peer, tsrc, plan, aux),
                "lib_stage": lambda: enc_stage.write_chunk(peer_stage, tsrc, plan, aux),
            }
            times: dict[str, list[float]] = {k: [] for k in variants}
            for fn in variants.values():      # warm-up (first contact, staging growth)
                fn()
            names = list(variants)
            for r in range(repeats):          # rotate the order: no variant always follows another
                for k in names[r % len(names):] + names[:r % len(names)]:
                    times[k].append(_timed(variants[k]))
            with peer.engine.lock:
                for a in traw[3]:
                    peer.engine.unregister(a)
            # the library's own CPU work per write (validation, staging, triples), noise-free
            def build(src_):
                with peer.engine.lock:
                    tr = enc.build_triples(peer, src_, plan, aux)
                    for a in tr[3]:
                        peer.engine.unregister(a)
            build_b = statistics.median(_timed(lambda: build(bsrc)) for _ in range(max(repeats, 20)))
            build_t = statistics.median(_timed(lambda: build(tsrc)) for _ in range(max(repeats, 20)))
            # register-vs-copy for TensorSource embeddings
            copy_buf = torch.zeros(T, hidden, dtype=dtype)
            copy_t = statistics.median(_timed(lambda: copy_tensor(copy_buf, emb[:T])) for _ in range(repeats))
            del copy_buf
            reg_t = []
            for _ in range(repeats):
                t = time.perf_counter()
                peer.engine.register(emb.data_ptr(), T * layout.emb_row_bytes)
                peer.engine.unregister(emb.data_ptr())
                reg_t.append(time.perf_counter() - t)
            # correctness, bit for bit: one more write of each source, then compare
            dints = dst.embeddings.view(torch.uint8)
            sints = src_pool.embeddings.view(torch.uint8)
            ints = emb.view(torch.uint8).view(max_tokens, -1)

            def nrows(j):
                return min(block_size, T - j * block_size)

            enc.write_chunk(peer, bsrc, plan, aux)
            ref_ok = all(torch.equal(dints[b, :nrows(j)], sints[src_blocks[j], :nrows(j)])
                         for j, b in enumerate(dst_blocks))
            ref_ok = ref_ok and all(torch.equal(dst.mrope[b, :, :nrows(j)], src_pool.mrope[src_blocks[j], :, :nrows(j)])
                                    for j, b in enumerate(dst_blocks))
            for e, p in ((enc, peer), (enc_stage, peer_stage)):
                e.write_chunk(p, tsrc, plan, aux)
                ref_ok = ref_ok and all(torch.equal(dints[b, :nrows(j)], ints[j * block_size:j * block_size + nrows(j)])
                                        for j, b in enumerate(dst_blocks))
                ref_ok = ref_ok and torch.equal(dst.fill_ids[dst_blocks].flatten()[:T], fill[:T])
            ref_ok = ref_ok and int(dst.aux[dst_blocks[0], 0]) == T
            med = {k: statistics.median(v) for k, v in times.items()}
            best = {k: min(v) for k, v in times.items()}
            nbytes = sum(braw[2])
            rows.append({
                "tokens": T, "hidden": hidden, "dtype": str(dtype).removeprefix("torch."), "blocks": nb,
                "bytes": nbytes, "triples_block": len(braw[2]), "triples_tensor": len(traw[2]),
                **{f"{k}_ms": v * 1e3 for k, v in med.items()},
                **{f"{k}_GBps": nbytes / v / GB for k, v in med.items()},
                "ratio_block": med["lib_block"] / med["raw_block"],
                "ratio_tensor": med["lib_tensor"] / med["raw_tensor"],
                "ratio_stage": med["lib_stage"] / med["raw_tensor"],
                "ratio_block_min": best["lib_block"] / best["raw_block"],
                "ratio_tensor_min": best["lib_tensor"] / best["raw_tensor"],
                "build_block_us": build_b * 1e6, "build_tensor_us": build_t * 1e6,
                "emb_copy_ms": copy_t * 1e3, "emb_register_unregister_us": statistics.median(reg_t) * 1e6,
                "verified": ref_ok, "repeats": repeats,
            })
    finally:
        enc_stage.close()
        enc.close()
        lang.close()
    return rows


def format_table(rows: list[dict], costs: Optional[dict] = None) -> str:
    head = (f"{'tokens':>7} {'MiB':>7} {'trip':>5} | {'raw ms':>8} {'GB/s':>5} | {'block ms':>8} {'GB/s':>5} "
            f"{'ratio':>5} | {'tensor ms':>9} {'GB/s':>5} {'ratio':>5} | {'stage ms':>8} {'ratio':>5} | "
            f"{'copy ms':>7} {'reg us':>6} | {'build us b/t':>13} | {'min-ratio b/t':>13} ok")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['tokens']:>7} {r['bytes'] / 2**20:>7.1f} {r['triples_block']:>5} | "
            f"{r['raw_block_ms']:>8.3f} {r['raw_block_GBps']:>5.2f} | "
            f"{r['lib_block_ms']:>8.3f} {r['lib_block_GBps']:>5.2f} {r['ratio_block']:>5.3f} | "
            f"{r['lib_tensor_ms']:>9.3f} {r['lib_tensor_GBps']:>5.2f} {r['ratio_tensor']:>5.3f} | "
            f"{r['lib_stage_ms']:>8.3f} {r['ratio_stage']:>5.3f} | "
            f"{r['emb_copy_ms']:>7.3f} {r['emb_register_unregister_us']:>6.1f} | "
            f"{r['build_block_us']:>6.0f}/{r['build_tensor_us']:<6.0f} | "
            f"{r['ratio_block_min']:>6.3f}/{r['ratio_tensor_min']:<6.3f} {'y' if r['verified'] else 'N'}")
    lines.append("raw = batch_transfer_sync_write of the same triples, pre-registered; block/tensor = "
                 "MooncakeTransport.write_chunk; ratio = library / raw of the medians (goal <= 1.10), min-ratio = of the "
                 "fastest runs; stage ratio vs raw tensor; copy = staging copy of the embeddings; reg = register+"
                 "unregister of the same rows; build = the library's CPU work per write (validate, stage metadata, "
                 "build triples), block/tensor source")
    if costs:
        lines.append("engine: " + ", ".join(f"{k}={v:.3g}" for k, v in costs.items()))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="sizes <= 4096 tokens, 5 repeats")
    ap.add_argument("--tokens", default="1024,4096,8192,32768")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the rows (and engine costs) here")
    a = ap.parse_args(argv)
    tokens = [int(x) for x in a.tokens.split(",") if x.strip()]
    costs = engine_costs()
    rows = run(tokens, a.hidden, a.dtype, a.repeats, a.quick)
    print(format_table(rows, costs))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "engine": costs}, f, indent=1)
    bad = [r["tokens"] for r in rows if not r["verified"]]
    if bad:
        print(f"verification FAILED for {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
