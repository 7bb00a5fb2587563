"""Baselines the product is compared with, measured like the product's paths.

* ``memcpy``: the machine's single-thread memcpy (``torch`` ``copy_`` of the
  same embedding bytes into a pre-faulted buffer, ``torch.set_num_threads(1)``
  during the measurement) — the roofline.
* ``zmq-ipc`` / ``zmq-tcp``: the request's tensors pickled over ZeroMQ
  (``send_pyobj``, as serving stacks do) to a spawned child that unpickles
  them and acks; ipc:// socket and tcp:// on loopback.
* ``mp-queue``: a ``torch.multiprocessing`` (spawn) queue, i.e. shared-memory
  tensor passing: the sender's tensor is moved into shared memory, the child
  maps it and acks.

One sample runs from "send issued" to "ack received"; the receiver verifies
every message bit for bit after it acked (outside the timed window) and
reports the verdict separately.
"""

from __future__ import annotations

import logging
import os
import pickle
import secrets
import tempfile
import time
from typing import Callable

import torch

from .bench_common import (Child, ChildError, emb_bytes, equal_bits, make_data, repeats_for, serve, slice_data,
                           summarize)

log = logging.getLogger("embresume.bench")

ACK = b"a"


# ====================================================================== memcpy
def memcpy(expected, hidden: int, sizes: list[int], dtype: torch.dtype, profile: dict,
           tick: Callable[[str], None]) -> list[dict]:
    emb = expected[0]
    dst = torch.empty((max(sizes), hidden), dtype=dtype)
    dst.view(torch.uint8).fill_(0)  # pre-fault: the roofline never page-faults
    out = []
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for t in sizes:
            nbytes = emb_bytes(t, hidden, dtype)
            n = repeats_for(nbytes, profile)
            src, d = emb[:t], dst[:t]
            lat = []
            for i in range(n + profile["warmup"]):
                t0 = time.perf_counter()
                d.copy_(src)
                dt = time.perf_counter() - t0
                if i >= profile["warmup"]:
                    lat.append(dt)
            ok = equal_bits(d, src)
            out.append({"path": "memcpy", "tokens": t, "hidden": hidden, "dtype": str(dtype), "bytes": nbytes,
                        "latencies_s": lat, "verified": ok, "threads": 1, **summarize(lat, nbytes)})
            tick(f"memcpy {t}x{hidden}")
    finally:
        torch.set_num_threads(prev)
    return out


# ====================================================================== ZeroMQ
def _check(data, msg) -> bool:
    tokens, payload = msg[2], msg[3]
    e, f, m, d = slice_data(data, tokens)
    pe, pf, pm, pd = payload
    return equal_bits(pe, e) and equal_bits(pf, f) and equal_bits(pm, m) and pd == d


def _zmq_child(cmd_q, res_q) -> None:
    import zmq

    ctx = zmq.Context()
    ppid = os.getppid()
    state: dict = {}

    def handler(op, *args):
        if op == "bind":
            kind, hidden, max_tokens, dtype, seed = args
            state["data"] = make_data(hidden, max_tokens, dtype, seed)
            sock = ctx.socket(zmq.PAIR)
            sock.setsockopt(zmq.LINGER, 0)
            if kind == "ipc":
                path = os.path.join(tempfile.gettempdir(), f"embr-bench-{os.getpid()}-{secrets.token_hex(4)}.sock")
                sock.bind(f"ipc://{path}")
                state["ipc_path"] = path
            else:
                sock.bind("tcp://127.0.0.1:*")
            state["sock"] = sock
            return sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if op == "run":
            sock, data = state["sock"], state["data"]
            n = 0
            idle = time.monotonic()
            while True:
                if not sock.poll(1000):
                    if os.getppid() != ppid or time.monotonic() - idle > 300:
                        raise TimeoutError("no message from the bench for 300 s")
                    continue
                idle = time.monotonic()
                msg = sock.recv_pyobj()
                if msg[0] == "stop":
                    break
                sock.send(ACK)  # ack as soon as the tensors are usable
                ok = _check(data, msg)
                del msg
                sock.send(b"1" if ok else b"0")
                n += 1
            return n
        if op == "close":
            sock = state.pop("sock", None)
            if sock is not None:
                sock.close(0)
            path = state.pop("ipc_path", None)
            if path and os.path.exists(path):
                os.unlink(path)
            state.pop("data", None)
            return None
        raise ValueError(f"unknown op {op!r}")

    try:
        serve(cmd_q, res_q, handler)
    finally:
        handler("close")
        ctx.term()


class ZmqPickle:
    """Pickled tensors over ZeroMQ (``kind`` "ipc" or "tcp") to a spawned child."""

    def __init__(self, kind: str, wait: bool = True):
        self.kind = kind
        self.path = f"zmq-{kind}"
        self.child = Child(_zmq_child, name=f"zmq-{kind}", wait=wait)

    def measure(self, expected, hidden: int, sizes: list[int], dtype: torch.dtype, seed: int, profile: dict,
                tick: Callable[[str], None], timeout: float = 120.0) -> list[dict]:
        import zmq

        addr = self.child.call("bind", self.kind, hidden, max(sizes), dtype, seed, timeout=180)
        self.addr = addr
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(addr)
        self.child.send("run")
        out = []

        def wait(what: str) -> bytes:
            if not sock.poll(int(timeout * 1000)):
                raise ChildError(f"{self.path}: no {what} within {timeout:.0f}s")
            return sock.recv()

        try:
            seq = 0
            for t in sizes:
                nbytes = emb_bytes(t, hidden, dtype)
                n = repeats_for(nbytes, profile)
                # own storage: pickling a view would pickle the whole base tensor
                e, f, m, d = slice_data(expected, t)
                payload = (e.clone(), f.clone(), m.clone(), d)
                lat, ok = [], True
                for i in range(n + profile["warmup"]):
                    seq += 1
                    t0 = time.perf_counter()
                    sock.send_pyobj(("data", seq, t, payload), protocol=pickle.HIGHEST_PROTOCOL)
                    wait("ack")
                    dt = time.perf_counter() - t0
                    ok = (wait("verification") == b"1") and ok
                    if i >= profile["warmup"]:
                        lat.append(dt)
                out.append({"path": self.path, "tokens": t, "hidden": hidden, "dtype": str(dtype),
                            "bytes": nbytes, "latencies_s": lat, "verified": ok, **summarize(lat, nbytes)})
                tick(f"{self.path} {t}x{hidden}")
            sock.send_pyobj(("stop",))
            self.child.reply(timeout)
        finally:
            sock.close(0)
        self.child.call("close", timeout=30)
        return out

    def close(self) -> None:
        self.child.close()
        addr = getattr(self, "addr", "")
        if addr.startswith("ipc://"):  # the child removes it; a killed child cannot
            try:
                os.unlink(addr[len("ipc://"):])
            except OSError:
                pass


# ====================================================================== torch.multiprocessing queue
def _mpq_child(cmd_q, res_q) -> None:
    state: dict = {}

    def handler(op, *args):
        if op == "data":
            hidden, max_tokens, dtype, seed = args
            state["data"] = make_data(hidden, max_tokens, dtype, seed)
            return None
        if op == "tensor":
            seq, tokens, e, f, m, d = args
            res_q.put(("ack", seq))  # the tensors are mapped: usable now
            ok = _check(state["data"], ("tensor", seq, tokens, (e, f, m, d)))
            return ok
        if op == "close":
            state.clear()
            return None
        raise ValueError(f"unknown op {op!r}")

    serve(cmd_q, res_q, handler)


class MpQueue:
    """Shared-memory tensor passing through a torch.multiprocessing queue."""

    path = "mp-queue"

    def __init__(self, wait: bool = True):
        import torch.multiprocessing as tmp
        self.child = Child(_mpq_child, name="mp-queue", ctx=tmp.get_context("spawn"), wait=wait)

    def measure(self, expected, hidden: int, sizes: list[int], dtype: torch.dtype, seed: int, profile: dict,
                tick: Callable[[str], None], timeout: float = 120.0) -> list[dict]:
        self.child.call("data", hidden, max(sizes), dtype, seed, timeout=180)
        out = []
        seq = 0
        for t in sizes:
            nbytes = emb_bytes(t, hidden, dtype)
            n = repeats_for(nbytes, profile)
            e0, f0, m0, d = slice_data(expected, t)
            lat, ok = [], True
            for i in range(n + profile["warmup"]):
                seq += 1
                # a fresh (not yet shared) tensor each time, as a model's output would be
                e, f, m = e0.clone(), f0.clone(), m0.clone()
                t0 = time.perf_counter()
                self.child.send("tensor", seq, t, e, f, m, d)
                self.child.reply(timeout, expect="ack")
                dt = time.perf_counter() - t0
                ok = bool(self.child.reply(timeout)) and ok
                del e, f, m
                if i >= profile["warmup"]:
                    lat.append(dt)
            out.append({"path": self.path, "tokens": t, "hidden": hidden, "dtype": str(dtype), "bytes": nbytes,
                        "latencies_s": lat, "verified": ok, **summarize(lat, nbytes)})
            tick(f"{self.path} {t}x{hidden}")
        self.child.call("close", timeout=30)
        return out

    def close(self) -> None:
        self.child.close()
