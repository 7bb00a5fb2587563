"""The product's own paths, end to end, across two processes.

The :class:`~embresume.encoder.EncoderEndpoint` runs in a child started with
the ``spawn`` context (:func:`encoder_child`); the
:class:`~embresume.language.LanguageEndpoint` runs in the bench process.  The
child builds the embeddings from a seed and registers them for a list of rooms
(``send_tensors``) *before* the clock starts; one sample is the time from
``LanguageEndpoint.request`` (inside ``recv``) to the merged result in the
bench process — allocation, INIT over the control ring, the encoder's block
copy, the status, the gather into the merged tensor.  Every result is then
compared bit for bit with the bench process's own copy of the data.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Callable, Optional

import torch

from .bench_common import (Child, ChildError, emb_bytes, equal_bits, free_port, make_data, repeats_for, serve,
                           slice_data, summarize)

BLOCK = 128


# ====================================================================== child
class _EncoderServer:
    def __init__(self) -> None:
        self.enc = None
        self.data = None
        self.slices: dict[int, tuple] = {}

    def __call__(self, op: str, *args):
        return getattr(self, "op_" + op)(*args)

    def op_open(self, cfg_kw: dict, data_spec: tuple) -> dict:
        from embresume.config import Config
        from embresume.encoder import EncoderEndpoint
        from embresume.errors import BindFailed

        self.op_close()
        hidden, max_tokens, dtype, seed, device = data_spec
        t = time.perf_counter()
        data = make_data(hidden, max_tokens, dtype, seed)
        if device != "cpu":
            data = tuple(x.to(device) for x in data)
        self.data = data
        gen_s = time.perf_counter() - t
        last = None
        for _ in range(20):  # a fresh free port each try: concurrent runs never collide
            cfg = Config(**cfg_kw, encoder_endpoint=f"tcp://127.0.0.1:{free_port()}")
            try:
                self.enc = EncoderEndpoint(cfg)
                break
            except BindFailed as e:    # the port was taken in between: another one
                last = e
        else:
            raise last
        return {"address": self.enc.address, "gen_s": gen_s}

    def op_register(self, rooms: list, tokens: int) -> int:
        s = self.slices.get(tokens)
        if s is None:
            s = self.slices[tokens] = slice_data(self.data, tokens)
        e, f, m, d = s
        for room in rooms:
            self.enc.send_tensors(room, e, f, m, mrope_delta=d)
        return len(rooms)

    def op_stats(self) -> dict:
        return dict(self.enc.stats) if self.enc is not None else {}

    def op_close(self) -> dict:
        stats = {}
        if self.enc is not None:
            stats = dict(self.enc.stats)
            try:
                self.enc.close()
            finally:
                self.enc = None
        self.data = None
        self.slices.clear()
        return stats


def encoder_child(cmd_q, res_q, quiet: bool = True) -> None:
    """Entry point of the encoder process (spawn target)."""
    logging.basicConfig(level=logging.WARNING)
    if quiet:
        logging.getLogger("embresume").setLevel(logging.CRITICAL)
    server = _EncoderServer()
    try:
        serve(cmd_q, res_q, server)
    finally:
        server.op_close()


# ====================================================================== parent
def resume_chunk(total: int, resumes: int, block: int = BLOCK) -> int:
    """The smallest per-allocation token count (a multiple of ``block``) that
    splits ``total`` tokens into exactly ``resumes + 1`` chunks."""
    want = resumes + 1
    for c in range(block, total + block, block):
        if -(-total // c) == want:
            return c
    raise ValueError(f"{total} tokens cannot be split into {want} chunks of whole {block}-token blocks")


class EndpointBench:
    """One product path (``shm``, ``cuda_ipc`` or ``mooncake``): an encoder
    child plus language endpoints created per experiment in this process."""

    def __init__(self, path: str, transport: str, device: str, dtype: torch.dtype, seed: int, profile: dict,
                 quiet: bool = True, wait: bool = True, lang_kw: Optional[dict] = None, sweep_only: bool = False):
        self.path, self.transport, self.device, self.dtype = path, transport, device, dtype
        self.lang_kw = dict(lang_kw or {})
        self.sweep_only = sweep_only
        self.seed, self.profile = seed, profile
        self.request_timeout = float(profile.get("request_timeout", 120.0))
        self.rooms = itertools.count(1)
        self.address: Optional[str] = None
        self.hidden: Optional[int] = None
        self.expected = None
        self.child = Child(encoder_child, (quiet,), name=f"encoder-{path}", wait=wait)

    # ------------------------------------------------------------ set-up
    def _cfg_kw(self, hidden: int) -> dict:
        return dict(hidden_size=hidden, dtype=self.dtype, block_size=BLOCK, transport=self.transport,
                    device=self.device, request_timeout=self.request_timeout, handshake_timeout=30.0,
                    peer_timeout=10.0, heartbeat_interval=0.5, mooncake_protocol="tcp")

    def open(self, hidden: int, max_tokens: int, expected) -> None:
        """(Re)open the encoder endpoint for ``hidden``; ``expected`` is this
        process's copy of :func:`make_data` (moved to the device if needed)."""
        info = self.child.call("open", self._cfg_kw(hidden), (hidden, max_tokens, self.dtype, self.seed,
                                                              self.device), timeout=180)
        self.address = info["address"]
        self.hidden = hidden
        self.rooms = itertools.count(1)
        if self.device != "cpu":
            expected = tuple(x.to(self.device) for x in expected)
        self.expected = expected

    def language(self, **kw):
        from embresume.config import Config
        from embresume.language import LanguageEndpoint
        base = self._cfg_kw(self.hidden)
        base.update(encoder_endpoint=self.address, prefault=True)
        base.update(self.lang_kw)
        base.update(kw)
        return LanguageEndpoint(Config(**base))

    def close(self) -> None:
        try:
            if self.child.proc.is_alive():
                self.child.call("close", timeout=30)
        except ChildError:
            pass
        finally:
            self.expected = None
            self.child.close()

    # ------------------------------------------------------------ helpers
    def _verify(self, res, tokens: int, chunks: Optional[int] = None) -> bool:
        e, f, m, d = slice_data(self.expected, tokens)
        ok = (res.total_tokens == tokens and equal_bits(res.embeddings, e) and equal_bits(res.fill_ids, f)
              and equal_bits(res.mrope_positions, m) and res.mrope_delta == d)
        if chunks is not None:
            ok = ok and res.chunks == chunks
        return bool(ok)

    def _sync(self) -> None:
        if self.device != "cpu":
            torch.cuda.synchronize()

    def _register(self, n: int, tokens: int) -> list[int]:
        rooms = [next(self.rooms) for _ in range(n)]
        self.child.call("register", rooms, tokens, timeout=60)
        return rooms

    def _timed_recv(self, lang, tokens: int, n: int, warmup: int, chunks: Optional[int]):
        rooms = self._register(n + warmup, tokens)
        lat, ok, seen_chunks = [], True, set()
        for i, room in enumerate(rooms):
            t0 = time.perf_counter()
            res = lang.recv(room, timeout=self.request_timeout)
            self._sync()
            dt = time.perf_counter() - t0
            ok = self._verify(res, tokens, chunks) and ok
            seen_chunks.add(res.chunks)
            res.release()  # as a serving loop would, once the model consumed it
            del res
            if i >= warmup:
                lat.append(dt)
        return lat, ok, sorted(seen_chunks)

    # ------------------------------------------------------------ experiments
    def sweep(self, sizes: list[int], tick: Callable[[str], None]) -> list[dict]:
        """Latency/throughput per size, no resume (the pool holds the largest request)."""
        max_t = max(sizes)
        blocks = -(-max_t // BLOCK)
        out = []
        lang = self.language(default_allocate_tokens=blocks * BLOCK, pool_blocks=blocks)
        try:
            for t in sizes:
                nbytes = emb_bytes(t, self.hidden, self.dtype)
                n = repeats_for(nbytes, self.profile)
                lat, ok, chunks = self._timed_recv(lang, t, n, self.profile["warmup"], chunks=1)
                out.append({"path": self.path, "tokens": t, "hidden": self.hidden, "dtype": str(self.dtype),
                            "bytes": nbytes, "latencies_s": lat, "verified": ok, "chunks": chunks,
                            **summarize(lat, nbytes)})
                tick(f"{self.path} {t}x{self.hidden}")
        finally:
            lang.close()
        return out

    def resume(self, total: int, targets: list[int], tick: Callable[[str], None]) -> list[dict]:
        """Same total tokens, default allocations forcing each number of resumes."""
        nbytes = emb_bytes(total, self.hidden, self.dtype)
        out = []
        for k in targets:
            chunk = resume_chunk(total, k)
            lang = self.language(default_allocate_tokens=chunk, max_chunk_tokens=chunk,
                                 pool_blocks=-(-total // BLOCK))
            try:
                n = max(self.profile["min_repeats"], self.profile.get("resume_repeats", 10))
                lat, ok, chunks = self._timed_recv(lang, total, n, self.profile["warmup"], chunks=k + 1)
                resumes_done = lang.stats["resumes"]
            finally:
                lang.close()
            out.append({"path": self.path, "resumes": k, "measured_resumes": [c - 1 for c in chunks],
                        "chunk_tokens": chunk, "tokens": total, "hidden": self.hidden, "dtype": str(self.dtype),
                        "bytes": nbytes, "latencies_s": lat, "verified": ok,
                        "language_resume_messages": resumes_done, **summarize(lat, nbytes)})
            tick(f"{self.path} resume x{k}")
        base = next((e for e in out if e["resumes"] == 0), None)
        for e in out:
            e["ratio_to_no_resume"] = e["p50_s"] / base["p50_s"] if base else None
        return out

    def concurrency(self, tokens: int, levels: list[int], tick: Callable[[str], None]) -> list[dict]:
        """N requests in flight: request N rooms, then wait for each."""
        nbytes = emb_bytes(tokens, self.hidden, self.dtype)
        blocks = -(-tokens // BLOCK)
        pool_blocks = blocks * max(levels)
        out = []
        lang = self.language(default_allocate_tokens=blocks * BLOCK, pool_blocks=pool_blocks)
        try:
            for n in levels:
                lat, thr, walls, ok = [], [], [], True
                batches = self.profile["conc_batches"]
                for b in range(batches + 1):  # batch 0 warms up
                    rooms = self._register(n, tokens)
                    done = []
                    t0 = time.perf_counter()
                    for r in rooms:
                        lang.request(r)
                    for r in rooms:
                        lang.wait(r, timeout=self.request_timeout)
                        done.append(time.perf_counter() - t0)
                    results = []
                    for r in rooms:
                        results.append(lang.result(r))  # raises TransferFailed on a failed room
                    self._sync()
                    wall = time.perf_counter() - t0
                    ok = all(self._verify(res, tokens, 1) for res in results) and ok
                    for res in results:
                        res.release()
                    del results
                    if b:
                        lat.extend(done)
                        walls.append(wall)
                        thr.append(n * nbytes / wall / 1e9)
                thr_sorted = sorted(thr)
                out.append({"path": self.path, "in_flight": n, "tokens": tokens, "hidden": self.hidden,
                            "dtype": str(self.dtype), "bytes_per_request": nbytes, "pool_blocks": pool_blocks,
                            "batches": batches, "latencies_s": lat, "batch_wall_s": walls,
                            "throughput_gbps": thr_sorted[len(thr_sorted) // 2] if thr else float("nan"),
                            "verified": ok, **{k: v for k, v in summarize(lat, nbytes).items()
                                               if not k.startswith("gbps")}})
                tick(f"{self.path} concurrency {n}")
        finally:
            lang.close()
        return out
