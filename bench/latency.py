"""Control-path latency (issue 11): where a small request's time goes.

Measured in one run, side by side (``run_latency`` / ``format_table``)::

    python -m embresume.bench.latency [--requests N] [--quick] [--json out.json]

1. **1-token requests, end to end**, hidden 4096 bf16 (the default allocation
   of 8192 tokens, so every INIT carries 64 block indices).  The encoder runs
   in a spawned child (or in this process for ``in-process``); the language
   endpoint in this process.  Two orders:

   * ``send-first``: the encoder child registered the embeddings of rooms
     ``0..N-1`` in one batch before the clock starts; one sample is
     ``LanguageEndpoint.request()`` -> ``wait()`` -> ``result()`` returned, in
     the caller's thread.  No command queue hop is inside the interval.
   * ``request-first``: the language requests first; a driver thread in the
     encoder process registers the room's embedding (``send_tensors``) as soon
     as the INIT arrived (it is told by a hook on the encoder's INIT handler).
     One sample runs from the driver's ``send_tensors()`` call to ``result()``
     returning in the language process (CLOCK_MONOTONIC is system-wide, so the
     two processes' ``perf_counter_ns`` agree).  ``request->result`` is also
     reported; it includes the hook's wake-up of the driver thread, which is
     an artefact of the benchmark.

   over ``shm``, ``mooncake`` (tcp, loopback; skipped with the reason when
   Mooncake is unavailable) and ``in-process`` (both endpoints in this
   process, shm), plus ``shm paced``: send-first with 1 ms of idle between
   requests (every thread is parked when the request comes), and an A/B of
   the ring readers' spin: the default ``ring_spin_us`` against 0, chunks of
   requests interleaved between two encoder children in the same run.

2. **Baselines** in the same run: a bare shm ring ping-pong between two
   processes (``ShmRing``, 64-byte message), a ZeroMQ 4 KiB round trip (PAIR,
   tcp loopback, echo child), a raw Mooncake 4 KiB ``transfer_sync_write``
   (two engines in this process), and a Python thread hop (SimpleQueue
   ping-pong between two threads of one process).

3. **Breakdown**: probes (wrappers installed at run time in both processes;
   no endpoint file is edited) timestamp every hand-off of one request; the
   table gives, per event, the median offset from ``request()`` and the median
   of each consecutive segment over all requests.  Clean and instrumented
   chunks of requests alternate, so the probes' own cost (one extra Python
   frame each, ~1-3 us) shows as the difference of the two end-to-end
   medians.  Probes whose method no longer exists are listed as missing,
   never fatal.  Shm (both orders), in-process and Mooncake (send-first).

4. **Copy overhead**: 1024 and 8192 tokens x 4096 bf16, end-to-end p50 of the
   default merged path against the two copies it has to make (source -> a
   pre-faulted pool-like buffer, that buffer -> a recycled result buffer; the
   same single-thread ``np.copyto`` the kernels use), and of the zero-copy
   path against its one copy; samples interleaved one by one.

5. **Idle CPU**: a connected, idle pair (encoder child + language endpoint
   here) for 10 s (5 s quick): CPU % of each process from ``/proc/<pid>/stat``.

6. **Throughput** with 8, 32 and 64 requests of 1024 tokens x 4096 in flight.

Every result is verified bit for bit, outside the timed interval, with numpy
on the calling thread: ``torch.equal`` on a large tensor runs on torch's
OpenMP threads, which keep spinning after the parallel region (libgomp) and
took the other core from the next request's encoder (measured: +5.4 ms on a
1024-token request, +6.1 ms on an 8192-token one).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import logging
import os
import queue
import statistics
import sys
import threading
import time
import traceback
from typing import Callable, Optional

import numpy as np
import torch

from .bench_common import Child, ChildError, equal_bits, free_port, machine_description, make_data, percentile, serve

NS = time.perf_counter_ns          # CLOCK_MONOTONIC on Linux: comparable across processes
HIDDEN = 4096
DTYPE = torch.bfloat16
BLOCK = 128
DEFAULT_ALLOC = 8192
SCHEMA = 1

GOAL_P50_US = 150.0
GOAL_P99_US = 500.0
GOAL_COPY_RATIO = 1.25
IDLE_SPIN_PCT = 2.0                 # above this an idle process is reported as spinning

log = logging.getLogger("embresume.bench.latency")


# ====================================================================== statistics
def _stats_ns(xs: list) -> dict:
    if not xs:
        return {"n": 0}
    us = [x / 1e3 for x in xs]
    return {"n": len(us), "p50_us": percentile(us, 50), "p90_us": percentile(us, 90), "p99_us": percentile(us, 99),
            "mean_us": sum(us) / len(us), "min_us": min(us), "max_us": max(us)}


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


# ====================================================================== probes
def _message_types() -> dict:
    from embresume import protocol as P
    return {name: getattr(P, name) for name in ("Init", "Resume", "StatusMsg", "Progress") if hasattr(P, name)}


def _room_in(args) -> Optional[int]:
    """The room an instrumented call is about: the first int argument or the
    first argument with a ``room`` key (a message, a room or request record),
    also one level down (a room machine's action: ``.room.room``, ``.req.room``)."""
    for x in args[1:]:
        if isinstance(x, int) and not isinstance(x, bool):
            return x
        r = getattr(x, "room", None)
        if r is None:
            r = getattr(getattr(x, "req", None), "room", None)
        elif not isinstance(r, (int, str, bytes)):
            r = getattr(r, "room", None)
        if isinstance(r, (int, str, bytes)) and not isinstance(r, bool):
            return r
    return None


def _subclasses(cls) -> list:
    out, todo = [], [cls]
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.__subclasses__())
    return out


class Probes:
    """Timestamps of one request's hand-offs, recorded by wrappers installed
    on the endpoint classes of this process (``perf_counter_ns``).

    ``rec[room][event]`` is the first time ``event`` happened for ``room``.
    Each wrapper is one extra Python frame (a probe costs ~1-3 us; compare the
    instrumented end-to-end time with the clean one of the same run).
    Wrappers whose target no longer exists are listed in ``missing``."""

    def __init__(self) -> None:
        self.rec: dict = {}
        self.tls = threading.local()
        self.installed: list = []
        self.missing: list[str] = []
        self.mt = _message_types()
        self.kinds = {cls: name for name, cls in self.mt.items()}

    # ------------------------------------------------------------ recording
    def mark(self, room, event: str, t: Optional[int] = None) -> None:
        if room is None:
            return
        d = self.rec.get(room)
        if d is None:
            d = self.rec[room] = {}
        if event not in d:
            d[event] = NS() if t is None else t

    def _msg(self, args):
        kinds = self.kinds
        name = kinds.get(type(args[-1])) if args else None
        if name is not None:
            return name, args[-1]
        for x in args:
            name = kinds.get(type(x))
            if name is not None:
                return name, x
        return None, None

    def _types(self, *kinds: str) -> tuple:
        return tuple(cls for name, cls in self.mt.items() if name in kinds)

    def _select(self, *kinds: str):
        """args -> room, for calls whose last argument is a message of one of ``kinds``."""
        types = tuple(cls for name, cls in self.mt.items() if name in kinds)

        def room_of(a):
            m = a[-1] if a else None
            return m.room if type(m) in types else None
        return room_of

    # ------------------------------------------------------------ wrapping
    def wrap(self, owner, attr: str, label: str, room_of=None, pre=None, post=None, hook=None) -> bool:
        """Wrap ``owner.attr``: ``room_of(args)`` picks the room (None: not
        recorded); ``pre``/``post`` are the event names marked before/after
        the call.  ``hook(raw) -> wrapper`` builds a special-purpose wrapper instead."""
        try:
            raw = inspect.getattr_static(owner, attr)
        except AttributeError:
            self.missing.append(f"{label} ({getattr(owner, '__name__', owner)}.{attr} not found)")
            return False
        if isinstance(raw, (staticmethod, classmethod)) or not callable(raw):
            self.missing.append(f"{label} ({getattr(owner, '__name__', owner)}.{attr} is not a plain method)")
            return False
        own = attr in getattr(owner, "__dict__", {})
        rec = self.rec
        ns = NS
        if hook is not None:
            wrapper = hook(raw)
        else:
            @functools.wraps(raw)
            def wrapper(*a, **k):
                room = room_of(a)
                if room is None:
                    return raw(*a, **k)
                d = rec.get(room)
                if d is None:
                    d = rec[room] = {}
                if pre is not None and pre not in d:
                    d[pre] = ns()
                out = raw(*a, **k)
                if post is not None and post not in d:
                    d[post] = ns()
                return out

        setattr(owner, attr, wrapper)
        self.installed.append((owner, attr, own, raw))
        return True

    def uninstall(self) -> None:
        for owner, attr, own, raw in reversed(self.installed):
            if own:
                setattr(owner, attr, raw)
            else:
                try:
                    delattr(owner, attr)
                except AttributeError:
                    pass
        self.installed.clear()

    # ------------------------------------------------------------ installation
    def install_common(self) -> None:
        """Channels and rings: used by both endpoints."""
        tls, rec, ns, kinds = self.tls, self.rec, NS, self.kinds
        try:
            from embresume.channel import Channel
        except Exception as e:
            self.missing.append(f"channel probes (embresume.channel: {e})")
            Channel = None
        if Channel is not None:
            try:  # make the subclasses known
                import embresume.ipc.channel  # noqa: F401
            except Exception:
                pass
            names = {"Init": ("lang.init_send_start", "lang.init_written"),
                     "Resume": ("lang.resume_send_start", "lang.resume_written"),
                     "StatusMsg": ("enc.status_send_start", "enc.status_sent"),
                     "Progress": ("enc.progress_send_start", "enc.progress_sent")}
            by_type = {cls: names[name] for cls, name in kinds.items() if name in names}

            def send_hook(raw):
                @functools.wraps(raw)
                def send(*a, **k):
                    ev = by_type.get(type(a[-1])) if a else None
                    if ev is None:
                        return raw(*a, **k)
                    room = a[-1].room
                    d = rec.get(room)
                    if d is None:
                        d = rec[room] = {}
                    if ev[0] not in d:
                        d[ev[0]] = ns()
                    out = raw(*a, **k)
                    if ev[1] not in d:
                        d[ev[1]] = ns()
                    return out
                return send

            def deliver_hook(raw):
                @functools.wraps(raw)
                def deliver(*a, **k):
                    tls.deliver_ns = ns()
                    return raw(*a, **k)
                return deliver

            for cls in _subclasses(Channel):
                if "send" in cls.__dict__ or cls is Channel:
                    self.wrap(cls, "send", f"{cls.__name__}.send", hook=send_hook)
                if "deliver" in cls.__dict__ or cls is Channel:
                    self.wrap(cls, "deliver", f"{cls.__name__}.deliver", hook=deliver_hook)
        ring = _ring_class()
        if ring is None:
            self.missing.append("ring wake-up (ShmRing not importable)")
        else:
            def recv_hook(raw):
                @functools.wraps(raw)
                def recv(*a, **k):
                    out = raw(*a, **k)
                    if out is not None:
                        tls.recv_ns = ns()
                    return out
                return recv
            self.wrap(ring, "recv", "ShmRing.recv", hook=recv_hook)

    def _arrival_hook(self, side: str, kinds: tuple, decoded: str, done: str):
        """The endpoint's message handler: when the frame arrived (ring wake-up,
        deliver), when it was decoded, when the handler returned."""
        tls, rec, ns = self.tls, self.rec, NS
        types = tuple(cls for name, cls in self.mt.items() if name in kinds)
        woke, dlv = f"{side}.recv_woke", f"{side}.deliver"

        def hook(raw):
            @functools.wraps(raw)
            def on_message(*a, **k):
                m = a[-1] if a else None
                if type(m) not in types:
                    return raw(*a, **k)
                t = ns()
                d = rec.get(m.room)
                if d is None:
                    d = rec[m.room] = {}
                for attr, ev in (("recv_ns", woke), ("deliver_ns", dlv)):
                    v = getattr(tls, attr, None)
                    if v is not None:
                        setattr(tls, attr, None)
                        if ev not in d:
                            d[ev] = v
                if decoded not in d:
                    d[decoded] = t
                out = raw(*a, **k)
                if done not in d:
                    d[done] = ns()
                return out
            return on_message
        return hook

    def install_encoder(self) -> None:
        try:
            from embresume.encoder import EncoderEndpoint as E
        except Exception as e:
            self.missing.append(f"encoder probes ({e})")
            return
        tls = self.tls
        self.wrap(E, "_on_message", "encoder message handler",
                  hook=self._arrival_hook("enc", ("Init", "Resume"), "enc.decoded", "enc.reader_done"))
        self.wrap(E, "_handle", "encoder handler under the lock", self._select("Init", "Resume"),
                  "enc.locked", "enc.handled")
        self.wrap(E, "_register", "encoder send registration", _room_in, "enc.register_start", "enc.registered")

        def write_room(a):
            room = _room_in(a)
            tls.write_room = room
            return room

        self.wrap(E, "_write", "encoder write job", write_room, "enc.write_start", "enc.write_exit")
        try:
            from embresume.transport.base import Transport
            for mod in ("embresume.transport.shm", "embresume.ipc.transport", "embresume.transport.mooncake"):
                try:
                    __import__(mod)
                except Exception:
                    pass
            n = 0
            for cls in _subclasses(Transport):
                if "write_chunk" in cls.__dict__:
                    n += self.wrap(cls, "write_chunk", f"{cls.__name__}.write_chunk",
                                   lambda a: getattr(tls, "write_room", None), post="enc.data_written")
            if not n:
                self.missing.append("data written (no Transport.write_chunk found)")
        except Exception as e:
            self.missing.append(f"data written ({e})")

    def install_language(self) -> None:
        try:
            from embresume.language import LanguageEndpoint as L
        except Exception as e:
            self.missing.append(f"language probes ({e})")
            return
        tls = self.tls
        self.wrap(L, "_on_message", "language message handler",
                  hook=self._arrival_hook("lang", ("StatusMsg", "Progress"), "lang.decoded", "lang.reader_done"))
        self.wrap(L, "request", "language request()", _room_in, "lang.request_entered", "lang.request_returned")
        try:
            from embresume.rooms.language import LanguageRooms as R      # the room machine (no I/O)
        except Exception:       # an older tree: the endpoint held the room logic itself
            R = None
        self.wrap(R or L, "status" if R else "_on_status", "language status handler", self._select("StatusMsg")
                  if not R else (lambda a: a[2].room if len(a) > 2 and type(a[2]) in self._types("StatusMsg")
                                 else None), post="lang.status_handled")

        def copy_room(a):
            room = _room_in(a)
            tls.copy_room = room
            return room

        self.wrap(L, "_copy", "language copy job", copy_room, "lang.copy_start", "lang.copy_exit")
        self.wrap(R or L, "_succeed" if R else "_chunk_done", "language chunk done (Success set)", _room_in,
                  post="lang.success_set")
        try:
            from embresume.merge import MergeBuffer
            self.wrap(MergeBuffer, "add", "merge copy", lambda a: getattr(tls, "copy_room", None),
                      post="lang.copy_done")
        except Exception as e:
            self.missing.append(f"merge copy ({e})")


def _ring_class():
    try:
        from embresume.ipc.ring import ShmRing
        return ShmRing
    except Exception:
        return None


#: events that happen off the request's critical chain (concurrently with it)
#: (a sender's return from its ring write is not a hand-off: the woken peer
#: often runs first, on the sender's core)
PARALLEL = {"lang.request_returned", "enc.reader_done", "enc.write_exit", "lang.copy_exit", "lang.reader_done",
            "lang.request_entered", "enc.register_start", "lang.init_written", "enc.status_sent",
            "lang.resume_written", "enc.progress_sent"}


def breakdown(recs: dict, start: str, end: str = "caller.result_returned") -> dict:
    """Per event the median offset from ``start``; per consecutive pair of
    events (ordered by their median offset) the median of the segment."""
    rows = [r for r in recs.values() if start in r and end in r]
    if not rows:
        return {"rooms": 0, "events": [], "segments": [], "parallel": []}
    events = sorted({e for r in rows for e in r})
    off = {e: _median([r[e] - r[start] for r in rows if e in r]) / 1e3 for e in events}
    chain = sorted((e for e in events if e not in PARALLEL and off[e] >= 0), key=lambda e: off[e])
    segs = []
    for a, b in zip(chain, chain[1:]):
        d = [(r[b] - r[a]) / 1e3 for r in rows if a in r and b in r]
        segs.append({"from": a, "to": b, "median_us": _median(d), "p90_us": percentile(d, 90), "n": len(d)})
    total = [(r[end] - r[start]) / 1e3 for r in rows]
    return {"rooms": len(rows), "start": start, "end": end,
            "events": [{"event": e, "median_offset_us": off[e]} for e in chain],
            "segments": segs,
            "parallel": [{"event": e, "median_offset_us": off[e]} for e in events if e in PARALLEL or off[e] < 0],
            "total_median_us": _median(total), "total_p90_us": percentile(total, 90),
            "sum_of_segment_medians_us": sum(s["median_us"] for s in segs)}


# ====================================================================== encoder server
class EncoderServer:
    """Runs an :class:`EncoderEndpoint` (in a child, or in this process)."""

    def __init__(self) -> None:
        self.enc = None
        self.data = None
        self.slices: dict = {}
        self.probes: Optional[Probes] = None
        self._rf_q: Optional[queue.SimpleQueue] = None
        self._rf_times: dict = {}
        self._rf_thread: Optional[threading.Thread] = None
        self._rf_err: list = []
        self._hook_mode = None

    def __call__(self, op: str, *args):
        return getattr(self, "op_" + op)(*args)

    def op_open(self, cfg_kw: dict, max_tokens: int, seed: int) -> dict:
        from embresume.config import Config
        from embresume.encoder import EncoderEndpoint
        from embresume.errors import BindFailed

        self.data = make_data(HIDDEN, max_tokens, DTYPE, seed)
        si = (cfg_kw.get("extra") or {}).get("bench_switchinterval")
        if si:
            sys.setswitchinterval(si)
        last = None
        for _ in range(20):
            cfg = Config(**cfg_kw, encoder_endpoint=f"tcp://127.0.0.1:{free_port()}")
            try:
                self.enc = EncoderEndpoint(cfg)
                break
            except BindFailed as e:    # the port was taken in between: another one
                last = e
        else:
            raise last
        self._install_hook()
        return {"address": self.enc.address, "pid": os.getpid()}

    def _slice(self, tokens: int):
        s = self.slices.get(tokens)
        if s is None:
            e, f, m = self.data
            s = self.slices[tokens] = (e[:tokens], f[:tokens], m[:, :tokens].contiguous(), 7)
        return s

    def op_register(self, rooms: list, tokens: int) -> int:
        e, f, m, d = self._slice(tokens)
        for room in rooms:
            self.enc.send_tensors(room, e, f, m, mrope_delta=d)
        return len(rooms)

    # ------------------------------------------------------------ request-first
    def _install_hook(self) -> None:
        """Tell the driver thread when an INIT arrived (instance-level wrapper)."""
        enc = self.enc
        mt = _message_types()
        init_cls = mt.get("Init")
        for name in ("_on_init", "_handle", "_on_message"):
            orig = getattr(enc, name, None)
            if orig is None:
                continue

            def hooked(*a, _orig=orig, **k):
                out = _orig(*a, **k)
                q = self._rf_q
                if q is not None:
                    for x in a:
                        if init_cls is not None and isinstance(x, init_cls):
                            q.put(x.room)
                return out

            setattr(enc, name, hooked)
            self._hook_mode = name
            return
        self._hook_mode = "poll"

    def op_arm(self, rooms: list, tokens: int) -> str:
        """Register each room's embedding as soon as its INIT arrived."""
        self.op_armed_times(0.0)  # a previous driver must be gone
        e, f, m, d = self._slice(tokens)
        q: queue.SimpleQueue = queue.SimpleQueue()
        self._rf_times = {}
        self._rf_err = []
        times = self._rf_times
        enc = self.enc
        poll = self._hook_mode == "poll"

        def driver():
            try:
                for room in rooms:
                    if poll:
                        deadline = time.monotonic() + 60
                        while True:
                            try:
                                enc.poll(room)
                                break
                            except KeyError:
                                if time.monotonic() > deadline:
                                    raise TimeoutError(f"no INIT for room {room}")
                                time.sleep(20e-6)
                    else:
                        while True:
                            got = q.get(timeout=60)
                            if got == room:
                                break
                    times[room] = NS()
                    enc.send_tensors(room, e, f, m, mrope_delta=d)
            except Exception as ex:  # reported by armed_times
                self._rf_err.append(f"{type(ex).__name__}: {ex}")

        self._rf_q = q
        self._rf_thread = threading.Thread(target=driver, name="bench-rf-driver", daemon=True)
        self._rf_thread.start()
        return self._hook_mode

    def op_armed_times(self, timeout: float = 60.0) -> dict:
        t = self._rf_thread
        if t is not None:
            t.join(timeout)
            if t.is_alive() and timeout:
                raise TimeoutError("request-first driver did not finish")
            if not t.is_alive():
                self._rf_thread = None
        self._rf_q = None
        if self._rf_err:
            raise RuntimeError(self._rf_err[0])
        return dict(self._rf_times)

    # ------------------------------------------------------------ probes
    def op_probes_on(self) -> list:
        self.op_probes_off()
        p = self.probes = Probes()
        p.install_common()
        p.install_encoder()
        return p.missing

    def op_probes_off(self) -> dict:
        p, self.probes = self.probes, None
        if p is None:
            return {}
        p.uninstall()
        return {"rec": p.rec, "missing": p.missing}

    def op_stats(self) -> dict:
        return dict(self.enc.stats) if self.enc is not None else {}

    def op_close(self) -> dict:
        stats = {}
        self.op_probes_off()
        if self.enc is not None:
            try:
                self.op_armed_times(0.0)
            except Exception:
                pass
            stats = dict(self.enc.stats)
            try:
                self.enc.close()
            finally:
                self.enc = None
        self.data = None
        self.slices.clear()
        return stats


def _encoder_child(cmd_q, res_q) -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("embresume").setLevel(logging.CRITICAL)
    server = EncoderServer()
    try:
        serve(cmd_q, res_q, server)
    finally:
        server.op_close()


class _Encoder:
    """The encoder, in a spawned child (``remote``) or in this process."""

    def __init__(self, remote: bool, cfg_kw: dict, max_tokens: int, seed: int = 0):
        self.remote = remote
        if remote:
            self.child = Child(_encoder_child, name="latency-encoder")
            self.server = None
        else:
            self.child = None
            self.server = EncoderServer()
        info = self.call("open", cfg_kw, max_tokens, seed, timeout=180)
        self.address, self.pid = info["address"], info["pid"]

    def call(self, op: str, *args, timeout: float = 120.0):
        if self.remote:
            return self.child.call(op, *args, timeout=timeout)
        return self.server(op, *args)

    def close(self) -> None:
        try:
            if self.remote:
                if self.child.proc.is_alive():
                    try:
                        self.child.call("close", timeout=30)
                    except ChildError:
                        pass
                self.child.close()
            else:
                self.server.op_close()
        except Exception:
            log.debug("encoder close failed", exc_info=True)


# ====================================================================== language side
def _cfg_kw(transport: str) -> dict:
    kw = dict(hidden_size=HIDDEN, dtype=DTYPE, block_size=BLOCK, transport=transport,
              request_timeout=60.0, handshake_timeout=30.0, mooncake_protocol="tcp")
    if transport == "auto":
        # the encoder: accept every transport from a local peer, where the
        # configuration knows the restriction (newer versions refuse Mooncake
        # from same-host peers unless allowed)
        import dataclasses
        from embresume.config import Config
        if "allowed_transports" in {f.name for f in dataclasses.fields(Config)}:
            kw["allowed_transports"] = ("shm", "cuda_ipc", "mooncake")
    return kw


def _language(address: str, transport: str, **kw):
    from embresume.config import Config
    from embresume.language import LanguageEndpoint
    base = _cfg_kw(transport)
    base.update(encoder_endpoint=address, default_allocate_tokens=DEFAULT_ALLOC,
                pool_blocks=2 * DEFAULT_ALLOC // BLOCK)
    base.update(kw)
    try:
        return LanguageEndpoint(Config(**base))
    except Exception as e:  # one retry: a handshake can race with the encoder's heartbeat (fixed upstream)
        log.warning("language endpoint failed to connect (%s); retrying once", e)
        return LanguageEndpoint(Config(**base))


class _Rooms:
    def __init__(self) -> None:
        self.next = 1

    def take(self, n: int) -> list:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality with numpy, on this thread: torch.equal on large tensors runs
    on torch's intra-op (OpenMP) threads, which keep spinning for milliseconds
    afterwards and steal the other core from the next request's encoder."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device.type != "cpu" or b.device.type != "cpu":
        return equal_bits(a, b)
    from embresume.kernels.cpu import as_numpy
    return bool(np.array_equal(as_numpy(a.contiguous()), as_numpy(b.contiguous())))


def _check(res, expected, tokens: int) -> bool:
    e, f, m = expected
    return bool(res.total_tokens == tokens and _same(res.embeddings, e[:tokens])
                and _same(res.fill_ids, f[:tokens]) and _same(res.mrope_positions, m[:, :tokens])
                and res.mrope_delta == 7)


def _timed_requests(lang, enc: _Encoder, rooms: list, tokens: int, order: str, expected, probes=None,
                    gap_s: float = 0.0, verify: bool = True, timeout: float = 60.0) -> dict:
    """One request per room, back to back (or ``gap_s`` apart); returns the
    per-request timestamps and the failures."""
    from embresume.status import Status

    if order == "send-first":
        enc.call("register", rooms, tokens)
    else:
        enc.call("arm", rooms, tokens)
    t_req, t_wait, t_res = {}, {}, {}
    failed, bad = [], 0
    for room in rooms:
        if gap_s:
            time.sleep(gap_s)
        t0 = NS()
        lang.request(room)
        st = lang.wait(room, timeout)
        t1 = NS()
        try:
            res = lang.result(room)
        except Exception as e:
            failed.append(f"room {room}: {st.name}: {e}")
            continue
        t2 = NS()
        t_req[room], t_wait[room], t_res[room] = t0, t1, t2
        if st is not Status.Success:
            failed.append(f"room {room}: {st.name}")
        if verify and not _check(res, expected, tokens):
            bad += 1
        res.release()
        if probes is not None:
            probes.mark(room, "request", t0)
            probes.mark(room, "caller.wait_returned", t1)
            probes.mark(room, "caller.result_returned", t2)
    t_send = enc.call("armed_times") if order == "request-first" else {}
    return {"t_req": t_req, "t_wait": t_wait, "t_res": t_res, "t_send": t_send, "failed": failed, "bad": bad}


def _latency_row(path: str, order: str, run: dict, warmup: int, note: str = "") -> dict:
    rooms = sorted(run["t_res"])[warmup:]
    if order == "send-first":
        lat = [run["t_res"][r] - run["t_req"][r] for r in rooms]
        extra = {}
    else:
        lat = [run["t_res"][r] - run["t_send"][r] for r in rooms if r in run["t_send"]]
        extra = {"request_to_result": _stats_ns([run["t_res"][r] - run["t_req"][r] for r in rooms])}
    row = {"path": path, "order": order, "measured": "request->result" if order == "send-first"
           else "send_tensors->result", **_stats_ns(lat), **extra,
           "failed": len(run["failed"]), "mismatched": run["bad"], "errors": run["failed"][:5]}
    if note:
        row["note"] = note
    return row


def _merge_runs(runs: list, skip: int) -> dict:
    """One run dict out of several chunks, without each chunk's first ``skip`` requests."""
    out = {"t_req": {}, "t_wait": {}, "t_res": {}, "t_send": {}, "failed": [], "bad": 0}
    for run in runs:
        keep = sorted(run["t_res"])[skip:]
        for k in ("t_req", "t_wait", "t_res", "t_send"):
            out[k].update({r: run[k][r] for r in keep if r in run[k]})
        out["failed"] += run["failed"]
        out["bad"] += run["bad"]
    return out


def _has_ring_spin() -> bool:
    import dataclasses
    from embresume.config import Config
    return "ring_spin_us" in {f.name for f in dataclasses.fields(Config)}


def _spin_ab(enc: "_Encoder", requests: int, warmup: int, rooms: "_Rooms", expected, cfg_extra: dict, say,
             chunks: int = 6) -> list:
    """The ring readers' spin (``Config.ring_spin_us``) against none, shm
    send-first, in one run: a second encoder child and language endpoint with
    ``ring_spin_us=0``; chunks of requests alternate between the two pairs."""
    from embresume.config import Config
    say("1-token shm send-first: ring spin A/B")
    spin = Config().ring_spin_us
    off = _Encoder(True, dict(_cfg_kw("auto"), ring_spin_us=0, **cfg_extra), 16)
    langs = {}
    try:
        langs["on"] = _language(enc.address, "shm")
        langs["off"] = _language(off.address, "shm", ring_spin_us=0)
        encs = {"on": enc, "off": off}
        runs = {"on": [], "off": []}
        chunks = max(1, min(chunks, requests))
        sizes = [requests // chunks + (1 if i < requests % chunks else 0) for i in range(chunks)]
        per = sizes[0]
        skip = max(2, warmup // chunks)
        for n in sizes:
            for k in ("on", "off"):
                runs[k].append(_timed_requests(langs[k], encs[k], rooms.take(n + skip), 1, "send-first", expected))
        return [_latency_row(f"shm, ring_spin_us={spin} (A/B)", "send-first", _merge_runs(runs["on"], skip), 0,
                             f"interleaved with the row below in chunks of {per}"),
                _latency_row("shm, ring_spin_us=0 (A/B)", "send-first", _merge_runs(runs["off"], skip), 0,
                             "readers sleep on the doorbell at once")]
    finally:
        for lang in langs.values():
            lang.close()
        off.close()


def _breakdown_run(enc: "_Encoder", path: str, order: str, requests: int, warmup: int, rooms: "_Rooms", expected,
                   chunks: int = 4) -> dict:
    """Probe one request's hand-offs.  Clean and instrumented chunks alternate
    (each on a fresh language endpoint: the probes must be in place before it
    connects), so the probes' own cost is measured in the same run."""
    chunks = max(1, min(chunks, requests))
    sizes = [requests // chunks + (1 if i < requests % chunks else 0) for i in range(chunks)]
    skip = max(2, warmup // chunks)
    local = _Encoder(False, dict(_cfg_kw("auto")), 16) if path == "in-process" else None
    e = local or enc
    transport = "shm" if path == "in-process" else path
    probes = Probes()
    clean_runs, inst_runs, recs, missing = [], [], {}, set()
    try:
        for per in sizes:
            lang = _language(e.address, transport)
            try:
                clean_runs.append(_timed_requests(lang, e, rooms.take(per + skip), 1, order, expected))
            finally:
                lang.close()
            probes.install_common()
            probes.install_language()
            try:
                if local is not None:
                    probes.install_encoder()
                else:
                    missing.update(e.call("probes_on"))
                lang = _language(e.address, transport)
                try:
                    inst_runs.append(_timed_requests(lang, e, rooms.take(per + skip), 1, order, expected,
                                                     probes=probes))
                finally:
                    lang.close()
                if local is None:
                    child = e.call("probes_off")
                    missing.update(child["missing"])
                    for r, v in child["rec"].items():
                        recs.setdefault(r, {}).update(v)
            finally:
                missing.update(probes.missing)
                probes.missing = []
                probes.uninstall()
    finally:
        if local is not None:
            local.close()
    for r, v in probes.rec.items():
        recs.setdefault(r, {}).update(v)
    run = _merge_runs(inst_runs, skip)
    clean = _merge_runs(clean_runs, skip)
    for r, t in run["t_send"].items():
        recs.setdefault(r, {})["enc.send_called"] = t
    recs = {r: v for r, v in recs.items() if r in run["t_res"]}
    start = "request" if order == "send-first" else "enc.send_called"
    b = breakdown(recs, start)
    b.update(path=path, order=order, chunks=chunks, missing_probes=sorted(missing),
             e2e_instrumented=_latency_row(path, order, run, 0), e2e_clean=_latency_row(path, order, clean, 0))
    pi, pc = b["e2e_instrumented"].get("p50_us"), b["e2e_clean"].get("p50_us")
    b["probe_overhead_p50_us"] = pi - pc if pi is not None and pc is not None else float("nan")
    return b


# ====================================================================== baselines
def _ring_echo_child(cmd_q, res_q) -> None:
    def handler(op, *args):
        if op == "echo":
            ShmRing = _ring_class()
            from embresume.ipc import unix
            from embresume.ipc.ring import RingClosed
            _, fds = unix.recv(args[0])            # the rings' fds, as in the handshake
            rx, tx = ShmRing.from_handles(fds[:3]), ShmRing.from_handles(fds[3:])
            unix.close_all(fds)
            args[0].close()
            res_q.put(("attached", None))
            n = 0
            try:
                while True:
                    try:
                        data = rx.recv(timeout=1.0)
                    except RingClosed:
                        break
                    if data is None:
                        continue
                    if data == b"stop":
                        break
                    tx.send(data)
                    n += 1
            finally:
                rx.close()
                tx.close()
            return n
        if op == "zmq":
            import zmq
            ctx = zmq.Context()
            s = ctx.socket(zmq.PAIR)
            s.setsockopt(zmq.LINGER, 0)
            s.bind("tcp://127.0.0.1:*")
            res_q.put(("bound", s.getsockopt_string(zmq.LAST_ENDPOINT)))
            n = 0
            try:
                while True:
                    if not s.poll(10000):
                        break
                    data = s.recv()
                    if data == b"stop":
                        break
                    s.send(data)
                    n += 1
            finally:
                s.close(0)
                ctx.term()
            return n
        raise ValueError(op)

    serve(cmd_q, res_q, handler)


def ring_pingpong(n: int, size: int = 64, warmup: int = 200) -> dict:
    ShmRing = _ring_class()
    if ShmRing is None:
        return {"name": "shm ring ping-pong", "skipped": "embresume.ipc.ring.ShmRing not importable"}
    import socket
    from embresume.ipc import unix
    a, b = ShmRing.create(1 << 16), ShmRing.create(1 << 16)
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = Child(_ring_echo_child, name="ring-echo")
    lat = []
    try:
        child.send("echo", there)               # the socket travels by fd (multiprocessing's reducer)
        unix.send(here, b"rings", a.handles() + b.handles())
        child.reply(60, expect="attached")
        payload = b"x" * size
        for i in range(n + warmup):
            t0 = NS()
            a.send(payload)
            got = b.recv(timeout=5)
            dt = NS() - t0
            if got != payload:
                raise RuntimeError("ring echo mismatch")
            if i >= warmup:
                lat.append(dt)
        a.send(b"stop")
        child.reply(30)
    finally:
        child.close()
        here.close()
        there.close()
        a.close()
        b.close()
    return {"name": f"shm ring ping-pong ({size} B, 2 processes)", **_stats_ns(lat)}


def zmq_roundtrip(n: int, size: int = 4096, warmup: int = 200) -> dict:
    import zmq
    child = Child(_ring_echo_child, name="zmq-echo")
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.PAIR)
    s.setsockopt(zmq.LINGER, 0)
    lat = []
    try:
        child.send("zmq")
        addr = child.reply(60, expect="bound")
        s.connect(addr)
        payload = b"y" * size
        for i in range(n + warmup):
            t0 = NS()
            s.send(payload)
            got = s.recv()
            dt = NS() - t0
            if len(got) != size:
                raise RuntimeError("zmq echo mismatch")
            if i >= warmup:
                lat.append(dt)
        s.send(b"stop")
        child.reply(30)
    finally:
        s.close(0)
        child.close()
    return {"name": f"ZeroMQ round trip ({size} B, PAIR, tcp loopback)", **_stats_ns(lat)}


def mooncake_write(n: int, size: int = 4096, warmup: int = 100) -> dict:
    name = f"raw Mooncake write ({size} B, tcp loopback, transfer_sync_write)"
    try:
        from embresume.transport import mooncake as mc
        mc.import_mooncake()
    except Exception as e:
        return {"name": name, "skipped": f"Mooncake unavailable: {type(e).__name__}: {e}"}
    key = ("tcp", "", "127.0.0.1")
    a = mc._new_engine(*key)
    b = mc._new_engine(*key)
    src = torch.empty(size, dtype=torch.uint8).fill_(1)
    dst = torch.zeros(size, dtype=torch.uint8)
    lat = []
    try:
        for te, t in ((a, src), (b, dst)):
            rc = te.register_memory(t.data_ptr(), size, "*")
            if rc != 0:
                raise RuntimeError(f"register_memory: {rc}")
        session = f"127.0.0.1:{b.get_rpc_port()}"
        fn = getattr(a, "transfer_sync_write", None)
        if fn is None:
            def fn(sess, s, d, k):
                return a.batch_transfer_sync_write(sess, [s], [d], [k])
        for i in range(n + warmup):
            t0 = NS()
            rc = fn(session, src.data_ptr(), dst.data_ptr(), size)
            dt = NS() - t0
            if rc != 0:
                raise RuntimeError(f"Mooncake write failed: {rc}")
            if i >= warmup:
                lat.append(dt)
    finally:
        for te, t in ((a, src), (b, dst)):
            try:
                te.unregister_memory(t.data_ptr())
            except Exception:
                pass
        mc._recycle_engine(key, a)
        mc._recycle_engine(key, b)
    return {"name": name, **_stats_ns(lat)}


def thread_hop(n: int, warmup: int = 200) -> dict:
    """Two threads of one process ping-pong through SimpleQueues (a hand-off and back)."""
    q1, q2 = queue.SimpleQueue(), queue.SimpleQueue()

    def echo():
        while True:
            x = q1.get()
            if x is None:
                return
            q2.put(x)

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    lat = []
    for i in range(n + warmup):
        t0 = NS()
        q1.put(i)
        q2.get()
        dt = NS() - t0
        if i >= warmup:
            lat.append(dt)
    q1.put(None)
    t.join(5)
    return {"name": "Python thread hop and back (SimpleQueue ping-pong, 1 process)", **_stats_ns(lat)}


# ====================================================================== copy overhead
def _copy_overhead(enc: _Encoder, rooms: _Rooms, expected, tokens_list, repeats: dict, warmup: int) -> list:
    from embresume.kernels.cpu import copy_tensor
    out = []
    max_t = max(tokens_list)
    bufA = torch.empty((max_t, HIDDEN), dtype=DTYPE)
    bufB = torch.empty((max_t, HIDDEN), dtype=DTYPE)
    bufA.view(torch.uint8).fill_(0)
    bufB.view(torch.uint8).fill_(0)
    blocks = -(-max_t // BLOCK)
    for zero_copy in (False, True):
        lang = _language(enc.address, "shm", zero_copy=zero_copy, default_allocate_tokens=max(DEFAULT_ALLOC, max_t),
                         pool_blocks=2 * max(blocks, DEFAULT_ALLOC // BLOCK))
        try:
            for tokens in tokens_list:
                n = repeats.get(tokens, 20)
                src = expected[0][:tokens]
                A, B = bufA[:tokens], bufB[:tokens]
                rs = rooms.take(n + warmup)
                enc.call("register", rs, tokens)
                e2e, c1, c2, failed, bad = [], [], [], 0, 0
                for i, room in enumerate(rs):
                    t0 = NS()
                    lang.request(room)
                    st = lang.wait(room, 60)
                    try:
                        res = lang.result(room)
                    except Exception:
                        failed += 1
                        continue
                    dt = NS() - t0
                    if not _check(res, expected, tokens):
                        bad += 1
                    res.release()
                    del res
                    t1 = NS()
                    copy_tensor(A, src)
                    t2 = NS()
                    if not zero_copy:
                        copy_tensor(B, A)
                    t3 = NS()
                    if i >= warmup:
                        e2e.append(dt)
                        c1.append(t2 - t1)
                        c2.append(t3 - t2)
                    if st.name != "Success":
                        failed += 1
                copies = [a + b for a, b in zip(c1, c2)]
                row = {"path": "zero-copy" if zero_copy else "merged (default)", "tokens": tokens,
                       "hidden": HIDDEN, "bytes": tokens * HIDDEN * 2, "n": len(e2e),
                       "e2e": _stats_ns(e2e), "copy_src_to_pool": _stats_ns(c1),
                       "copies_needed": 1 if zero_copy else 2, "copies": _stats_ns(copies),
                       "failed": failed, "mismatched": bad}
                if not zero_copy:
                    row["copy_pool_to_result"] = _stats_ns(c2)
                p_e, p_c = row["e2e"].get("p50_us"), row["copies"].get("p50_us")
                row["ratio_p50"] = p_e / p_c if p_e and p_c else float("nan")
                row["overhead_p50_us"] = p_e - p_c if p_e and p_c else float("nan")
                out.append(row)
        finally:
            lang.close()
    return out


# ====================================================================== idle CPU
def _cpu_ticks(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return int(parts[11]) + int(parts[12])   # utime, stime (fields 14, 15)
    except (OSError, IndexError, ValueError):
        return None


def _threads(pid: int) -> Optional[int]:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


def _idle_cpu(enc: _Encoder, transport: str, seconds: float) -> dict:
    hz = os.sysconf("SC_CLK_TCK")
    lang = _language(enc.address, transport)
    try:
        time.sleep(min(1.0, seconds))           # let the handshake's after-effects settle
        me = os.getpid()
        a0, b0, w0 = _cpu_ticks(me), _cpu_ticks(enc.pid), time.monotonic()
        time.sleep(seconds)
        a1, b1, w1 = _cpu_ticks(me), _cpu_ticks(enc.pid), time.monotonic()
        wall = w1 - w0
        lang_pct = (a1 - a0) / hz / wall * 100 if None not in (a0, a1) else float("nan")
        enc_pct = (b1 - b0) / hz / wall * 100 if None not in (b0, b1) else float("nan")
        row = {"pair": transport, "seconds": round(wall, 2), "language_cpu_pct": lang_pct,
               "encoder_cpu_pct": enc_pct, "language_threads": _threads(me), "encoder_threads": _threads(enc.pid),
               "clk_tck": hz}
        row["spinning"] = bool(lang_pct > IDLE_SPIN_PCT or enc_pct > IDLE_SPIN_PCT)
        return row
    finally:
        lang.close()


# ====================================================================== concurrency
def _concurrency(enc: _Encoder, rooms: _Rooms, expected, tokens: int, levels, batches: int) -> list:
    blocks = -(-tokens // BLOCK)
    lang = _language(enc.address, "shm", default_allocate_tokens=blocks * BLOCK, pool_blocks=blocks * max(levels))
    nbytes = tokens * HIDDEN * 2
    out = []
    try:
        for n in levels:
            walls, failed, bad = [], 0, 0
            for b in range(batches + 1):          # batch 0 warms up
                rs = rooms.take(n)
                enc.call("register", rs, tokens)
                t0 = NS()
                for r in rs:
                    lang.request(r)
                results = []
                for r in rs:
                    lang.wait(r, 60)
                    try:
                        results.append(lang.result(r))
                    except Exception:
                        failed += 1
                wall = NS() - t0
                for res in results:
                    if b == 0 or len(results) < 4 or res is results[0]:
                        if not _check(res, expected, tokens):
                            bad += 1
                    res.release()
                del results
                if b:
                    walls.append(wall)
            med = _median(walls)
            out.append({"in_flight": n, "tokens": tokens, "batches": batches,
                        "batch_wall_ms": med / 1e6, "throughput_gbps": n * nbytes / med if med else float("nan"),
                        "requests_per_s": n / (med / 1e9) if med else float("nan"),
                        "failed": failed, "mismatched": bad})
    finally:
        lang.close()
    return out


# ====================================================================== driver
def _mooncake_reason() -> Optional[str]:
    try:
        from embresume.transport import mooncake as mc
        mc.import_mooncake()
    except Exception as e:
        return f"Mooncake unavailable: {type(e).__name__}: {e}"
    return None


SECTIONS = ("latency", "baselines", "breakdown", "copy", "idle", "concurrency")


def run_latency(requests: int = 1000, quick: bool = False, *, sections=None, idle_seconds: Optional[float] = None,
                copy_tokens=(1024, 8192), copy_repeats: Optional[int] = None, conc_tokens: int = 1024,
                conc_levels=(8, 32, 64), conc_batches: Optional[int] = None, mooncake: bool = True,
                paths=("shm", "mooncake", "in-process"), orders=("send-first", "request-first"),
                breakdown_paths=None, switchinterval: Optional[float] = None,
                progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run the latency benchmark; returns a JSON-able dict (see :func:`format_table`).

    ``requests``: timed 1-token requests per (path, order) (plus a warm-up of
    ``max(5, requests // 20)``).  ``quick``: fewer copy samples, 5 s idle,
    one concurrency batch, breakdown of the shm path only."""
    sections = set(SECTIONS if sections is None else sections)
    say = progress or (lambda s: None)
    old_switch = sys.getswitchinterval()
    if switchinterval:
        sys.setswitchinterval(switchinterval)
    cfg_extra = {"extra": {"bench_switchinterval": switchinterval}} if switchinterval else {}
    warmup = max(5, min(100, requests // 20))
    idle_seconds = (5.0 if quick else 10.0) if idle_seconds is None else idle_seconds
    conc_batches = (1 if quick else 3) if conc_batches is None else conc_batches
    if breakdown_paths is None:
        breakdown_paths = ("shm",) if quick else ("shm", "in-process", "mooncake")
    mc_reason = None if mooncake else "disabled (--no-mooncake)"
    if mc_reason is None and "mooncake" in paths:
        mc_reason = _mooncake_reason()
    result: dict = {"schema": SCHEMA, "quick": quick, "requests": requests, "warmup": warmup,
                    "clock": "time.perf_counter_ns = " + time.get_clock_info("perf_counter").implementation,
                    "machine": machine_description(), "hidden": HIDDEN, "dtype": "bf16",
                    "default_allocate_tokens": DEFAULT_ALLOC,
                    "load_average_start": os.getloadavg(), "latency": [], "baselines": [], "breakdown": [],
                    "copy_overhead": [], "idle_cpu": [], "concurrency": [], "skipped": {}, "errors": []}
    t_start = time.monotonic()
    max_tokens = max([1, conc_tokens] + list(copy_tokens if "copy" in sections else [1]))
    expected = make_data(HIDDEN, max_tokens, DTYPE, 0)
    rooms = _Rooms()

    def guard(what: str, fn):
        try:
            return fn()
        except Exception as e:
            result["errors"].append(f"{what}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}")
            say(f"{what} FAILED: {e}")
            return None

    enc: Optional[_Encoder] = None
    try:
        say("starting the encoder child")
        enc = _Encoder(True, dict(_cfg_kw("auto"), **cfg_extra), max_tokens)

        # ---------------------------------------------------------- 1-token latency
        if "latency" in sections:
            for path in paths:
                if path == "mooncake" and mc_reason:
                    result["skipped"]["mooncake"] = mc_reason
                    continue
                for order in orders:
                    def one(path=path, order=order):
                        say(f"1-token {path} {order}")
                        if path == "in-process":
                            local = _Encoder(False, dict(_cfg_kw("auto")), 16)
                            try:
                                lang = _language(local.address, "shm")
                                try:
                                    run = _timed_requests(lang, local, rooms.take(requests + warmup), 1, order,
                                                          expected)
                                finally:
                                    lang.close()
                            finally:
                                local.close()
                        else:
                            lang = _language(enc.address, path)
                            try:
                                run = _timed_requests(lang, enc, rooms.take(requests + warmup), 1, order, expected)
                            finally:
                                lang.close()
                        result["latency"].append(_latency_row(path, order, run, warmup))
                    guard(f"latency {path} {order}", one)
            if "shm" in paths:
                def paced():
                    say("1-token shm send-first, paced 1 ms")
                    lang = _language(enc.address, "shm")
                    try:
                        n = requests if not quick else min(requests, 300)
                        run = _timed_requests(lang, enc, rooms.take(n + warmup), 1, "send-first", expected,
                                              gap_s=0.001)
                    finally:
                        lang.close()
                    result["latency"].append(_latency_row("shm paced 1 ms", "send-first", run, warmup,
                                                          "1 ms idle before each request"))
                guard("latency shm paced", paced)
                if _has_ring_spin():
                    guard("latency shm ring spin A/B",
                          lambda: result["latency"].extend(_spin_ab(enc, requests, warmup, rooms, expected,
                                                                    cfg_extra, say)))

        # ---------------------------------------------------------- baselines
        if "baselines" in sections:
            n = max(requests, 200)
            for name, fn in (("ring", lambda: ring_pingpong(n)), ("zmq", lambda: zmq_roundtrip(n)),
                             ("mooncake", lambda: mooncake_write(n) if not mc_reason else
                              {"name": "raw Mooncake write (4096 B)", "skipped": mc_reason}),
                             ("thread", lambda: thread_hop(n))):
                say(f"baseline {name}")
                row = guard(f"baseline {name}", fn)
                if row is not None:
                    result["baselines"].append(row)

        # ---------------------------------------------------------- breakdown
        if "breakdown" in sections:
            for path in breakdown_paths:
                if path == "mooncake" and mc_reason:
                    continue
                for order in (("send-first", "request-first") if path == "shm" else ("send-first",)):
                    def bd(path=path, order=order):
                        say(f"breakdown {path} {order}")
                        result["breakdown"].append(_breakdown_run(enc, path, order, requests, warmup, rooms,
                                                                  expected))
                    guard(f"breakdown {path} {order}", bd)

        # ---------------------------------------------------------- copies
        if "copy" in sections:
            reps = {t: (copy_repeats or (60 if quick else (300 if t <= 2048 else 100))) for t in copy_tokens}
            say("copy overhead")
            rows = guard("copy overhead", lambda: _copy_overhead(enc, rooms, expected, list(copy_tokens), reps,
                                                                 warmup=3))
            result["copy_overhead"] = rows or []

        # ---------------------------------------------------------- concurrency
        if "concurrency" in sections:
            say("concurrency")
            rows = guard("concurrency", lambda: _concurrency(enc, rooms, expected, conc_tokens, list(conc_levels),
                                                             conc_batches))
            result["concurrency"] = rows or []

        # ---------------------------------------------------------- idle
        if "idle" in sections:
            pairs = ["shm"] + (["mooncake"] if not quick and not mc_reason and "mooncake" in paths else [])
            for pair in pairs:
                say(f"idle {pair} {idle_seconds:g} s")
                row = guard(f"idle {pair}", lambda pair=pair: _idle_cpu(enc, pair, idle_seconds))
                if row is not None:
                    result["idle_cpu"].append(row)
    finally:
        if enc is not None:
            enc.close()
        sys.setswitchinterval(old_switch)
    result["switchinterval_s"] = switchinterval or old_switch
    result["load_average_end"] = os.getloadavg()
    result["wall_s"] = time.monotonic() - t_start
    result["goals"] = _goals(result)
    result["all_ok"] = _all_ok(result)
    return result


def _all_ok(r: dict) -> bool:
    if r["errors"]:
        return False
    rows = r["latency"] + r["copy_overhead"] + r["concurrency"]
    for b in r["breakdown"]:
        rows += [b["e2e_instrumented"], b["e2e_clean"]]
    return all(not x.get("failed") and not x.get("mismatched") for x in rows)


def _goals(r: dict) -> list:
    out = []
    for row in r["latency"]:
        if row["path"] == "shm" and row["order"] == "send-first" and row.get("n"):
            out.append({"goal": f"1-token shm p50 <= {GOAL_P50_US:g} us", "value": row["p50_us"],
                        "pass": row["p50_us"] <= GOAL_P50_US})
            out.append({"goal": f"1-token shm p99 <= {GOAL_P99_US:g} us", "value": row["p99_us"],
                        "pass": row["p99_us"] <= GOAL_P99_US})
    for row in r["copy_overhead"]:
        out.append({"goal": f"{row['path']} {row['tokens']} tok e2e p50 <= {GOAL_COPY_RATIO}x its "
                            f"{row['copies_needed']} cop{'y' if row['copies_needed'] == 1 else 'ies'}",
                    "value": row["ratio_p50"], "pass": row["ratio_p50"] <= GOAL_COPY_RATIO})
    for row in r["idle_cpu"]:
        out.append({"goal": f"idle {row['pair']} pair does not spin (each process <= {IDLE_SPIN_PCT:g} % CPU)",
                    "value": max(row["language_cpu_pct"], row["encoder_cpu_pct"]), "pass": not row["spinning"]})
    return out


# ====================================================================== report
def _f(x, nd=1) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return f"{x:.{nd}f}"


def format_table(r: dict) -> str:
    L = []
    m = r.get("machine", {})
    L.append(f"embresume control-path latency ({'quick' if r.get('quick') else 'full'}; {m.get('cpu_model', '?')}, "
             f"{m.get('usable_cores', '?')} cores, torch {m.get('torch', '?')}; load "
             f"{' '.join(f'{x:.2f}' for x in r.get('load_average_start', ()))}; {r.get('clock', '')})")
    L.append("")
    if r.get("latency"):
        L.append(f"1-token request, hidden {r['hidden']} bf16, INIT with {r['default_allocate_tokens'] // BLOCK} "
                 f"blocks; {r['requests']} timed requests each (+{r['warmup']} warm-up)")
        L.append("")
        L.append("| path | order | measured | p50 us | p90 us | p99 us | mean us | failed |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for x in r["latency"]:
            L.append(f"| {x['path']} | {x['order']} | {x['measured']} | {_f(x.get('p50_us'))} | "
                     f"{_f(x.get('p90_us'))} | {_f(x.get('p99_us'))} | {_f(x.get('mean_us'))} | "
                     f"{x['failed'] + x['mismatched']} |")
            if "request_to_result" in x:
                q = x["request_to_result"]
                L.append(f"| {x['path']} | {x['order']} | request->result (incl. bench driver hop) | "
                         f"{_f(q.get('p50_us'))} | {_f(q.get('p90_us'))} | {_f(q.get('p99_us'))} | "
                         f"{_f(q.get('mean_us'))} | |")
        for k, v in r.get("skipped", {}).items():
            L.append(f"| {k} | skipped: {v} | | | | | | |")
        L.append("")
    if r.get("baselines"):
        L.append("| baseline (same run) | p50 us | p90 us | p99 us | mean us |")
        L.append("| --- | --- | --- | --- | --- |")
        for b in r["baselines"]:
            if "skipped" in b:
                L.append(f"| {b['name']} | skipped: {b['skipped']} | | | |")
            else:
                L.append(f"| {b['name']} | {_f(b['p50_us'])} | {_f(b['p90_us'])} | {_f(b['p99_us'])} | "
                         f"{_f(b['mean_us'])} |")
        L.append("")
    for b in r.get("breakdown", []):
        e2e = b["e2e_instrumented"]
        L.append(f"Breakdown: {b['path']}, {b['order']}, {b['rooms']} requests, medians (end to end p50: "
                 f"{_f(b['e2e_clean'].get('p50_us'))} us clean, {_f(e2e.get('p50_us'))} us with the probes, "
                 f"interleaved in {b['chunks']} chunks; sum of segment medians "
                 f"{_f(b.get('sum_of_segment_medians_us'))} us)")
        L.append("")
        L.append("| hand-off | median us | p90 us | at (median offset) us |")
        L.append("| --- | --- | --- | --- |")
        offs = {e["event"]: e["median_offset_us"] for e in b["events"]}
        for s in b["segments"]:
            L.append(f"| {s['from']} -> {s['to']} | {_f(s['median_us'])} | {_f(s['p90_us'])} | "
                     f"{_f(offs.get(s['to']))} |")
        if b.get("parallel"):
            L.append("| off the chain: " + ", ".join(f"{p['event']} @ {_f(p['median_offset_us'])}"
                                                     for p in b["parallel"]) + " | | | |")
        if b.get("missing_probes"):
            L.append("| missing probes: " + "; ".join(b["missing_probes"]) + " | | | |")
        L.append("")
    if r.get("copy_overhead"):
        L.append("| copy overhead (shm, 4096 bf16) | tokens | e2e p50 ms | copies p50 ms | src->pool ms | "
                 "pool->result ms | e2e / copies | overhead ms |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for x in r["copy_overhead"]:
            c2 = x.get("copy_pool_to_result", {}).get("p50_us")
            L.append(f"| {x['path']} ({x['copies_needed']} cop{'y' if x['copies_needed'] == 1 else 'ies'}) | "
                     f"{x['tokens']} | {_f(x['e2e'].get('p50_us', 0) / 1e3, 3)} | "
                     f"{_f(x['copies'].get('p50_us', 0) / 1e3, 3)} | "
                     f"{_f(x['copy_src_to_pool'].get('p50_us', 0) / 1e3, 3)} | "
                     f"{_f(c2 / 1e3 if c2 else None, 3)} | {_f(x['ratio_p50'], 2)} | "
                     f"{_f(x['overhead_p50_us'] / 1e3, 3)} |")
        L.append("")
    if r.get("concurrency"):
        L.append("| in flight (shm) | tokens | batch wall ms | GB/s | requests/s |")
        L.append("| --- | --- | --- | --- | --- |")
        for x in r["concurrency"]:
            L.append(f"| {x['in_flight']} | {x['tokens']} | {_f(x['batch_wall_ms'], 2)} | "
                     f"{_f(x['throughput_gbps'], 2)} | {_f(x['requests_per_s'], 0)} |")
        L.append("")
    if r.get("idle_cpu"):
        L.append("| idle pair | seconds | language CPU % | encoder CPU % | threads (lang/enc) |")
        L.append("| --- | --- | --- | --- | --- |")
        for x in r["idle_cpu"]:
            L.append(f"| {x['pair']} | {x['seconds']} | {_f(x['language_cpu_pct'], 2)} | "
                     f"{_f(x['encoder_cpu_pct'], 2)} | {x['language_threads']}/{x['encoder_threads']} |")
        L.append("")
    if r.get("goals"):
        L.append("| goal | value | pass |")
        L.append("| --- | --- | --- |")
        for g in r["goals"]:
            L.append(f"| {g['goal']} | {_f(g['value'], 2)} | {'yes' if g['pass'] else 'NO'} |")
        L.append("")
    for e in r.get("errors", []):
        L.append("ERROR " + e)
    L.append(f"all requests succeeded and verified: {'yes' if r.get('all_ok') else 'NO'}; "
             f"wall {r.get('wall_s', 0):.1f} s")
    return "\n".join(L)


#: what each probe means, for people (the probe names are the code's)
EVENT_NAMES = {
    "request": "request() called",
    "enc.send_called": "send_tensors() called",
    "lang.request_entered": "request() entered",
    "lang.init_send_start": "language sends the INIT",
    "lang.resume_send_start": "language sends the RESUME",
    "enc.recv_woke": "encoder's reader wakes up",
    "enc.deliver": "encoder's reader has the message",
    "enc.decoded": "encoder decoded it",
    "enc.locked": "encoder took its lock",
    "enc.handled": "INIT checked, room planned",
    "enc.register_start": "encoder registers the source",
    "enc.registered": "source registered",
    "enc.write_start": "data write starts",
    "enc.data_written": "data written to the pool",
    "enc.status_send_start": "encoder sends the STATUS",
    "enc.progress_send_start": "encoder sends a PROGRESS",
    "lang.recv_woke": "language's reader wakes up",
    "lang.deliver": "language's reader has the message",
    "lang.decoded": "language decoded it",
    "lang.status_handled": "STATUS handled",
    "lang.copy_start": "merge copy starts",
    "lang.copy_done": "merge copy done",
    "lang.success_set": "blocks freed, Success set",
    "caller.wait_returned": "the caller wakes up",
    "caller.result_returned": "result() returned",
}


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "~"


def _short(name: str, width: int = 46) -> str:
    """A row name within ``width``: the last details of its parenthesis go first."""
    while len(name) > width and name.endswith(")") and ", " in name:
        name = name[:name.rindex(", ")] + ")"
    if len(name) > width and " (" in name:
        name = name[:name.index(" (")]
    return _clip(name, width)


def format_summary(r: dict, breakdown: bool = False) -> str:
    """The bench's default report of this section, every line within 80
    columns: the 1-token rows, the baselines, the goals; with ``breakdown``
    also where one request's time goes, step by step, in plain words."""
    L = []
    if r.get("latency"):
        L.append(f"1-token requests, hidden {r['hidden']} bf16, {r['requests']} timed each (microseconds):")
        L.append(f"  {'path':<46} {'p50':>8} {'p99':>8} {'failed':>7}")
        for x in r["latency"]:
            name = x["path"] if x["order"] == "send-first" else f"{x['path']} ({x['order']})"
            L.append(f"  {_short(name):<46} {_f(x.get('p50_us')):>8} {_f(x.get('p99_us')):>8} "
                     f"{x['failed'] + x['mismatched']:>7}")
        for k, v in r.get("skipped", {}).items():
            L.append(_clip(f"  {k}: skipped: {v}", 80))
    if r.get("baselines"):
        L.append("baselines in the same run (microseconds):")
        for b in r["baselines"]:
            if "skipped" in b:
                L.append(_clip(f"  {b['name']}: skipped: {b['skipped']}", 80))
            else:
                L.append(f"  {_short(b['name']):<46} {_f(b['p50_us']):>8} {_f(b['p99_us']):>8}")
    for x in r.get("copy_overhead", []):
        L.append(f"  copy overhead {x['tokens']} tokens: end to end / its copies {_f(x['ratio_p50'], 2)}")
    for x in r.get("idle_cpu", []):
        L.append(f"  idle {x['pair']} pair: CPU {_f(x['language_cpu_pct'], 2)} % (language), "
                 f"{_f(x['encoder_cpu_pct'], 2)} % (encoder)")
    if breakdown:
        for b in r.get("breakdown", []):
            L.append("")
            L.append(f"where one request's time goes: {b['path']}, {b['order']}, {b['rooms']} requests")
            L.append(f"(end to end p50 {_f(b['e2e_clean'].get('p50_us'))} us, "
                     f"{_f(b['e2e_instrumented'].get('p50_us'))} with the probes; us; at: since the start)")
            L.append(f"  {'step, until':<46} {'median':>8} {'p90':>8} {'at':>8}")
            offs = {e["event"]: e["median_offset_us"] for e in b["events"]}
            overlap = False
            for seg in b["segments"]:
                name = EVENT_NAMES.get(seg["to"], seg["to"])
                med = seg["median_us"]
                if med is not None and med < 0:
                    # the two events happen in either order (on two threads or processes):
                    # a difference of them has no meaningful median
                    cell, overlap = "overlap", True
                else:
                    cell = _f(med)
                L.append(f"  {_clip(name, 46):<46} {cell:>8} {_f(seg['p90_us']):>8} {_f(offs.get(seg['to'])):>8}")
            if overlap:
                L.append("  overlap: this step and the one before run at the same time, in either order")
            if b.get("missing_probes"):
                L.append(_clip("  missing probes: " + "; ".join(b["missing_probes"]), 80))
    if r.get("goals"):
        for g in r["goals"]:
            L.append(_clip(f"{'PASS' if g['pass'] else 'MISS'} {g['goal']}: {_f(g['value'], 1)}", 80))
    for e in r.get("errors", []):
        L.append(_clip("ERROR " + e, 80))
    L.append(f"all requests succeeded and verified: {'yes' if r.get('all_ok') else 'NO'}; "
             f"wall {r.get('wall_s', 0):.1f} s")
    return "\n".join(L)


# ====================================================================== CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m embresume.bench.latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000, help="timed 1-token requests per path and order")
    p.add_argument("--quick", action="store_true", help="fewer copy samples, 5 s idle, shm breakdown only")
    p.add_argument("--json", help="write the full result (every statistic) to this file")
    p.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--paths", help="comma-separated subset of shm,mooncake,in-process")
    p.add_argument("--orders", help="comma-separated subset of send-first,request-first")
    p.add_argument("--breakdown-paths", help="comma-separated subset of shm,in-process,mooncake "
                                            "(default: shm with --quick, all three otherwise)")
    p.add_argument("--idle-seconds", type=float)
    p.add_argument("--switchinterval", type=float,
                   help="experiment: sys.setswitchinterval(S) in this process and the encoder child")
    p.add_argument("--no-mooncake", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("embresume").setLevel(logging.CRITICAL)
    kw = {}
    if a.sections:
        kw["sections"] = [s for s in a.sections.split(",") if s]
        bad = set(kw["sections"]) - set(SECTIONS)
        if bad:
            p.error(f"unknown sections {sorted(bad)}")
    if a.paths:
        kw["paths"] = tuple(s for s in a.paths.split(",") if s)
    if a.orders:
        kw["orders"] = tuple(s for s in a.orders.split(",") if s)
    if a.breakdown_paths:
        kw["breakdown_paths"] = tuple(s for s in a.breakdown_paths.split(",") if s)
    if a.switchinterval:
        kw["switchinterval"] = a.switchinterval
    prog = None if a.quiet else (lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True))
    r = run_latency(a.requests, a.quick, idle_seconds=a.idle_seconds, mooncake=not a.no_mooncake, progress=prog,
                    **kw)
    print(format_table(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1, default=str)
    return 0 if r["all_ok"] else 1


if __name__ == "__main__":
    # re-import under the package name so spawned children find the functions
    from embresume.bench.latency import main as _main
    sys.exit(_main())
