"""Fuzz: 10,000 hostile or broken frames at a live encoder while it serves a legitimate rank.

The encoder runs in a child process (``EncoderProcess``) with an ``auth_key``,
so authenticated tcp frames reach its decoder and handshake code.  While a
legitimate same-host :class:`LanguageEndpoint` in this process receives
``N_LEGIT`` rooms of varied sizes (several need resumes), three threads throw
``N_FRAMES`` = 10,000 frames, deterministically generated from ``SEED``:

(a) tcp, ``N_ZMQ``: a ZeroMQ DEALER holding the right CURVE client keys (so it
    gets past ZAP) sends garbage, mutated/truncated encodings of every message
    kind, handshake Registers with odd descriptions (bad layouts, bad offers,
    unknown phases, non-object / non-finite / too deep JSON), INIT/RESUME/ABORT
    with out-of-range fields, multi-part messages, a few near-limit frames (1M
    block lists, 1 MiB descriptions) and over-limit ones; it reconnects every
    ``ZMQ_RECONNECT`` frames, leaving unread replies behind.
(b) Unix handshake socket, ``N_UNIX`` packets: garbage, mutated Registers,
    packets too large or with too many fds, hello+pool handshakes whose pool
    and rings are pipes, eventfds, /dev/null, unsealed or too small memfds,
    sealed memfds of the right size (the encoder maps them) with bad rings,
    bad ``{"$fd": i}`` references, and now and then a complete valid handshake
    that then hangs up or sends a packet after ``ready``.
(c) the connected shm ring of a second same-uid LanguageEndpoint (a "buggy
    peer"), ``N_RING`` frames via ``channel.send_bytes``: garbage, mutated
    messages, INIT/RESUME with the right session but out-of-range blocks,
    size mismatches or 200k-block lists, resumes of unknown rooms, aborts,
    messages of kinds an encoder never expects, and ``N_VALID_BUGGY`` valid
    INITs of rooms that never come (half of them aborted).  When the encoder
    drops it (a mutated frame may be a BYE), it reconnects.

Bounds asserted (the encoder child is measured after a warm-up of legitimate
traffic and ``N_WARMUP`` fuzz frames per surface, near-limit frames included,
which sets the allocators' high-water marks; the 10,000 frames come after):

* the legitimate rank: ``N_LEGIT``/``N_LEGIT`` rooms Success and bit-exact
  (some needing resumes); afterwards one more room succeeds and the encoder
  child is alive; the encoder failed no room but the buggy peer's
  (``N_VALID_BUGGY``);
* all 10,000 frames handed to the kernel / ZeroMQ within ``FUZZ_DEADLINE_S``;
* encoder RSS growth (VmRSS, shared mappings included) <= ``RSS_BOUND`` =
  64 MiB (the ~250 hostile pools the encoder maps, 4.2 MiB each, would
  exceed it many times over if a mapping leaked); its open fds grow by <=
  ``FD_BOUND`` = 8 and its threads by <= ``THREAD_BOUND`` = 4;
* encoder log (WARNING and up, captured in the child) during the 10,000
  frames: <= ``LOG_LINE_BOUND`` = 100 WARNING/ERROR/CRITICAL lines.  Every
  line a peer can cause goes through ``embresume.logutil.RateLimitedLog``:
  per kind of event (bad handshake frame, bad control message, rejected room,
  unexpected message, failed room, refused uid, unroutable frame, ...) at most
  10 lines per 10 s, so the few seconds of fuzz give at most 10 lines for
  each of the ~8 kinds, plus one ERROR per raw Unix peer that sent a packet
  after a complete handshake (~10): <= 90.  No traceback; <=
  ``LOG_BYTES_BOUND`` = 256 KiB in all; and, over the whole log, no line longer
  than ``LOG_LINE_LENGTH_BOUND`` = 8 KiB (the first bad frame, which is always
  logged, is a hello with a 300 kB layout: a peer's description must not be
  copied into the log; lines are clipped to 500 characters);
* this process: no fd left open (the autouse conftest fixture also checks
  the memfds).

About 20 s on 2 cores (the encoder child's start-up included).
"""

from __future__ import annotations

import collections
import fcntl
import functools
import json
import logging
import os
import random
import re
import socket
import struct
import sys
import threading
import time

import zmq

from embresume import auth, harness
from embresume import protocol as P
from embresume.blocks import BlockLayout
from embresume.config import parse_dtype
from embresume.encoder import MAX_FRAME
from embresume.errors import PeerError
from embresume.harness import EncoderProcess
from embresume.ipc import shm as ipc_shm
from embresume.ipc import unix
from embresume.ipc.ring import HEADER as RING_HEADER, ShmRing
from embresume.language import LanguageEndpoint
from embresume.status import Status
from embresume.synthetic import SyntheticData, image_token_counts

from conftest import make_config, state_machine_tests

SEED = 0x5EED_F022
KEY = "fuzz test auth key 0123456789abcdef"
HIDDEN = 256
BLOCK = 128
POOL_BLOCKS = 64
MAX_T = 6000

N_ZMQ, N_UNIX, N_RING = 4000, 3000, 3000
N_FRAMES = N_ZMQ + N_UNIX + N_RING
assert N_FRAMES == 10_000
N_WARMUP = 150                 # per surface, before the baseline
N_LEGIT = 60
LEGIT_BATCH = 4
N_VALID_BUGGY = 20
ZMQ_RECONNECT = 500
MAX_BUGGY_SESSIONS = 40

FUZZ_DEADLINE_S = 120.0
RSS_BOUND = 64 << 20
FD_BOUND = 8
THREAD_BOUND = 4
LOG_LINE_BOUND = 100
LOG_BYTES_BOUND = 256 << 10
LOG_LINE_LENGTH_BOUND = 8 << 10

BF16 = parse_dtype("bf16")
_ORIG_ENCODER_CHILD = harness._encoder_child
_LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): (.*)$")


# ---------------------------------------------------------------- the encoder child
def _logged_encoder_child(log_path, config, cmd_q, res_q, data_spec, *_log_level):
    """harness._encoder_child with its stderr and its log (WARNING and up, with
    levels) going to ``log_path`` (the harness's own log level is not used)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True,
                        format="%(levelname)s %(name)s: %(message)s")
    _ORIG_ENCODER_CHILD(config, cmd_q, res_q, data_spec)


def _proc_status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return {"rss": int(out["VmRSS"].split()[0]) * 1024, "threads": int(out["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def _read_log(path, offset: int = 0) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


def _log_summary(raw: bytes) -> dict:
    levels = collections.Counter()
    templates = collections.Counter()
    other = []
    for line in raw.decode(errors="replace").splitlines():
        m = _LEVEL.match(line)
        if m:
            levels[m.group(1)] += 1
            templates[f"{m.group(1)} {m.group(2)}: " + re.sub(r"'[^']*'|\"[^\"]*\"|\d+", "#", m.group(3))[:110]] += 1
        else:
            other.append(line[:200])
    return {"levels": levels, "templates": templates, "other": other,
            "bad": levels["WARNING"] + levels["ERROR"] + levels["CRITICAL"], "bytes": len(raw),
            "longest": max((len(x) for x in raw.splitlines()), default=0)}


# ---------------------------------------------------------------- frame generation
def _layout(num_blocks: int = POOL_BLOCKS) -> dict:
    return BlockLayout(num_blocks, BLOCK, HIDDEN, BF16, 16).to_dict()


def _room(rng: random.Random):
    """A fuzz room key (the legitimate rank's keys are 'legit-NNN' strs: never these)."""
    r = rng.random()
    if r < 0.55:
        return rng.randrange(1 << 20)
    if r < 0.65:
        return rng.choice([0, (1 << 64) - 1, 1 << 63, 1 << 32])
    if r < 0.85:
        return "fz/" + "".join(rng.choice("abcxyz/\u00e9\n") for _ in range(rng.randrange(0, 80)))
    return rng.randbytes(rng.randrange(0, 257))


def _blocks(rng: random.Random, big: bool = False) -> tuple:
    r = rng.random()
    if big:
        n = rng.choice([100_000, 200_000])
        start = rng.randrange(1 << 20)
        return tuple(range(start, start + n))
    if r < 0.4:
        return tuple(rng.sample(range(POOL_BLOCKS), rng.randrange(1, 9)))
    if r < 0.7:
        return tuple(rng.sample(range(POOL_BLOCKS * 4), rng.randrange(1, 9)))
    if r < 0.85:
        return (rng.choice([POOL_BLOCKS, 2**31, 2**32 - 1]),)
    return ()


def _u(rng, bits):
    return rng.choice([0, 1, (1 << bits) - 1, 1 << (bits - 1), rng.randrange(1 << bits)])


def _msg(rng: random.Random, session: str) -> P.Message:
    """A message of a random kind with random (often out-of-range) fields, encodable."""
    k = rng.randrange(9)
    if k in (0, 1):
        blocks = _blocks(rng)
        alloc = rng.choice([len(blocks) * BLOCK, len(blocks) * BLOCK + 1, 0, 1, _u(rng, 64)])
        f = dict(room=_room(rng), endpoint=rng.choice(["", "tcp://x:1", "e" * rng.randrange(4097)]),
                 dst_port=_u(rng, 32), session_id=session, dst_blocks=blocks,
                 required_dst_info_num=rng.choice([0, 1, 1, 2, 0xFFFF]), allocated_tokens=alloc, nonce=_u(rng, 64))
        return P.Init(**f) if k == 0 else P.Resume(**f, sent_tokens=rng.choice([0, 1, BLOCK, _u(rng, 64)]))
    if k == 2:
        return P.Abort(_room(rng), "r" * rng.randrange(50))
    if k == 3:
        return P.Heartbeat(_u(rng, 64), _u(rng, 64))
    if k == 4:
        return P.StatusMsg(_room(rng), rng.choice(list(Status)), _u(rng, 32), _u(rng, 32), _u(rng, 32),
                           _u(rng, 64), "s" * rng.randrange(30), rng.randrange(256))
    if k == 5:
        return P.Progress(_room(rng), _u(rng, 32), _u(rng, 32))
    if k == 6:
        return P.Bye("b" * rng.randrange(30))
    return P.Register(rng.choice([P.Role.LANGUAGE, P.Role.ENCODER]), session, "node", _u(rng, 32), _u(rng, 16),
                      rng.choice(["", "shm", "mooncake", "cuda_ipc", "x"]), _odd_desc(rng))


def _nested(depth: int):
    obj = {"phase": "hello"}
    for i in range(depth):
        obj = [obj] if i % 2 else {"x": obj}
    return obj


def _odd_desc(rng: random.Random) -> dict:
    lay = _layout()
    bad_layouts = [
        {}, [], "layout", 5, {**lay, "num_blocks": -1}, {**lay, "num_blocks": 10**40}, {**lay, "hidden": 0},
        {**lay, "dtype": "float99"}, {**lay, "dtype": ["bf16"]}, {**lay, "block_size": "abc"},
        {**lay, "block_size": 1 << 40}, {**lay, "aux_ints": -5}, {**lay, "hidden": 1.5e300},
        {k: v for k, v in lay.items() if k != "dtype"}, lay, lay, lay,
    ]
    choices = [
        lambda: {"phase": "hello"},
        lambda: {"phase": "hello", "layout": rng.choice(bad_layouts), "offer": ["shm"]},
        lambda: {"phase": "hello", "layout": lay, "offer": rng.choice(["shm", None, 7, {}, [1, 2], [[]], ["x"] * 5000,
                                                                       ["mooncake", "shm"], ["cuda_ipc"], []])},
        lambda: {"phase": rng.choice([5, None, "", "ready", "retry", "HELLO", "pool" * 100, ["hello"]])},
        lambda: {"phase": "pool", "pool": rng.choice([[], {}, "x", {"fd": 3, "nbytes": 1, "layout": lay},
                                                      {"fd": {"$fd": 0}, "nbytes": 10**30, "layout": lay}]),
                 "rings": rng.choice([None, {}, {"l2e": [1, 2, 3], "e2l": [{"$fd": 5}]}])},
        lambda: {"phase": "hello", "layout": lay, "offer": ["shm"], "deep": _nested(rng.choice([10, 28, 29]))},
        lambda: {"phase": "hello", "layout": lay, "offer": ["shm"], "pad": "p" * rng.randrange(1, 20000)},
        lambda: {"$fd": rng.randrange(-2, 20)},
    ]
    return rng.choice(choices)()


def _raw_register(blob: bytes, role: int = 1, session: str = "fz", transport: str = "") -> bytes:
    """A REGISTER frame with a hand-made description blob (non-standard JSON included)."""
    parts = [struct.pack("<4sBBH", P.MAGIC, P.VERSION, int(P.Kind.REGISTER), 0), struct.pack("<BHI", role, 0, 1)]
    for s in (session, "node", transport):
        b = s.encode()
        parts += [struct.pack("<H", len(b)), b]
    parts += [struct.pack("<I", len(blob)), blob]
    return b"".join(parts)


def _raw_blob(rng: random.Random, huge: bool = False) -> bytes:
    if huge:
        return json.dumps({"phase": "hello", "layout": _layout(), "offer": ["shm"],
                           "pad": "x" * (P.MAX_BLOB - 200)}).encode()
    return rng.choice([
        b'{"phase": "hello", "layout": {"num_blocks": NaN, "block_size": Infinity, "hidden": -Infinity, '
        b'"dtype": "bf16"}, "offer": ["shm"]}',
        b'{"phase": "hello", "layout": {"num_blocks": 1e999, "block_size": 128, "hidden": 256, "dtype": "bf16"}, '
        b'"offer": ["shm"]}',
        b"[" * 33 + b"]" * 33, b"[" * 5000 + b"]" * 5000, b'{"a":' * 40 + b"1" + b"}" * 40,
        b"[1, 2, 3]", b'"str"', b"null", b"\xff\xfe{}", b'{"phase": "hello"', b"", b"{}" * 3,
        b'{"phase": "hello", "offer": ["' + "\u00e9".encode() * 2000 + b'"]}',
        json.dumps({"phase": "hello", "layout": "L" * 300_000, "offer": ["shm"]}).encode(),
    ])


def _garbage(rng: random.Random) -> bytes:
    r = rng.random()
    n = rng.randrange(0, 17) if r < 0.3 else rng.randrange(17, 513) if r < 0.8 else rng.randrange(513, 8193)
    data = rng.randbytes(n)
    if rng.random() < 0.4 and n >= 8:
        data = struct.pack("<4sBBH", P.MAGIC, rng.choice([P.VERSION, P.VERSION, 1, 3, 255]), rng.randrange(12),
                           rng.randrange(65536)) + data[8:]
    return data


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        if op == 0 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2:
            del b[rng.randrange(len(b) + 1):]
        elif op == 3:
            b += rng.randbytes(rng.randrange(1, 64))
        elif op == 4 and len(b) >= 8:
            b[5] = rng.randrange(12)                        # another kind, same body
        elif op == 5 and len(b) >= 12:
            i = rng.randrange(8, len(b) - 3)
            b[i:i + 4] = struct.pack("<I", rng.choice([0, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, len(b)]))
        elif op == 6:
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randrange(1, 16))
        elif op == 7 and len(b) > 9:
            i = rng.randrange(len(b))
            del b[i:i + rng.randrange(1, 9)]
        elif op == 8 and len(b) >= 8:
            b[4] = rng.randrange(256)                       # version
    return bytes(b)


def _encode(msg) -> bytes:
    try:
        return P.encode(msg)
    except P.ProtocolError:
        return P.encode(P.Abort(1, "unencodable"))


# ---------------------------------------------------------------- (a) tcp
def _zmq_frames(rng: random.Random, i: int, huge: bool):
    """The i-th tcp message: a list of frames (one, except for multi-part ones)."""
    if huge:
        which = i % 3
        if which == 0:   # the largest INIT a frame may hold: 1M blocks
            n = P.MAX_BLOCKS
            start = rng.randrange(1 << 20)
            return [P.encode(P.Init(rng.randrange(1 << 20), "e", 0, "fz", tuple(range(start, start + n)), 1, n * BLOCK))]
        if which == 1:
            return [_raw_register(_raw_blob(rng, huge=True))]
        return [rng.randbytes(MAX_FRAME + 1)]            # over the limit: disconnected
    r = rng.random()
    if r < 0.25:
        return [_garbage(rng)]
    if r < 0.55:
        return [_mutate(rng, _encode(_msg(rng, "fz-tcp")))]
    if r < 0.75:
        return [_encode(P.Register(P.Role.LANGUAGE, f"fz-tcp-{i}", "node", 1, 0, "", _odd_desc(rng)))]
    if r < 0.85:
        return [_raw_register(_raw_blob(rng), session=f"fz-tcp-{i}")]
    if r < 0.97:
        return [_encode(_msg(rng, "fz-tcp"))]
    return [_garbage(rng) for _ in range(rng.randrange(2, 4))]     # multi-part


def _fuzz_zmq(address: str, keys, n: int, seed: int, huge_every: int, deadline: float, progress: list, slot: int):
    rng = random.Random(seed)
    ctx = zmq.Context.instance()
    sock = None
    sent = 0
    huge_at = set(range(huge_every // 2, n, huge_every)) if huge_every else set()
    try:
        i = 0
        while sent < n and time.monotonic() < deadline:
            if sock is None:
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDTIMEO, 5000)
                sock.setsockopt(zmq.RCVHWM, 50)     # never read: the encoder's replies pile up
                auth.make_client(sock, keys)
                sock.connect(address)
            frames = _zmq_frames(rng, i, i in huge_at)
            i += 1
            try:
                sock.send_multipart(frames, copy=True)
            except zmq.Again:
                sock.close(linger=0)
                sock = None
                continue
            sent += 1
            progress[slot] = sent
            if sent % ZMQ_RECONNECT == 0 or len(frames[0]) > MAX_FRAME:
                sock.close(linger=2000)             # what was queued goes out; replies are left behind
                sock = None
    finally:
        if sock is not None:
            sock.close(linger=2000)
    return sent


def _zmq_once(address: str, keys, frame: bytes) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    try:
        auth.make_client(sock, keys)
        sock.connect(address)
        sock.send(frame)
        sock.poll(5000)                 # the encoder's answer (a Bye): the frame was handled
    finally:
        sock.close(linger=0)


# ---------------------------------------------------------------- (b) Unix socket
class _Fds:
    """fds of one packet, made on demand and closed after the send."""

    def __init__(self):
        self.fds = []

    def add(self, fd: int) -> int:
        self.fds.append(fd)
        return len(self.fds) - 1

    def pipe(self) -> int:
        r, w = os.pipe()
        self.fds.append(w)
        return self.add(r)

    def memfd(self, size: int, sealed: bool) -> int:
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealed else 0))
        os.ftruncate(fd, size)
        if sealed:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ipc_shm.SEALS)
        return self.add(fd)

    def eventfd(self) -> int:
        return self.add(os.eventfd(0, os.EFD_CLOEXEC))

    def devnull(self) -> int:
        return self.add(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))

    def close(self) -> None:
        unix.close_all(self.fds)
        self.fds = []


def _hostile_pool(rng: random.Random, fds: _Fds, nbytes: int) -> dict:
    """A pool description whose fds are of the wrong kind, size or index."""
    lay = _layout()
    r = rng.randrange(10)
    if r == 0:
        fd = {"$fd": fds.pipe()}
    elif r == 1:
        fd = {"$fd": fds.memfd(nbytes, sealed=False)}
    elif r == 2:
        fd = {"$fd": fds.memfd(4096, sealed=True)}
    elif r == 3:
        fd = {"$fd": fds.eventfd()}
    elif r == 4:
        fd = {"$fd": fds.devnull()}
    elif r == 5:
        fd = rng.choice([0, 1, 2, 3, -1])                # a bare number: one of the encoder's own fds
    elif r == 6:
        fd = {"$fd": rng.choice([99, -1, True, "0", 1.0, None])}
    elif r == 7:
        i = fds.memfd(nbytes, sealed=True)
        return {"fd": {"$fd": i}, "nbytes": rng.choice([nbytes, 0, -1, 10**20, "x"]),
                "layout": rng.choice([lay, {**lay, "num_blocks": 10**9}, {**lay, "hidden": 1}])}
    else:                                                # a sealed pool of the right size: it gets mapped
        fd = {"$fd": fds.memfd(nbytes, sealed=True)}
    return {"fd": fd, "nbytes": nbytes, "layout": lay}


def _hostile_rings(rng: random.Random, fds: _Fds, own_rings: list) -> object:
    r = rng.randrange(7)
    if r == 0:
        return None
    if r == 1:
        return {"l2e": [{"$fd": fds.pipe()}, {"$fd": fds.eventfd()}, {"$fd": fds.eventfd()}],
                "e2l": [{"$fd": fds.memfd(8192, sealed=False)}, {"$fd": fds.eventfd()}, {"$fd": fds.eventfd()}]}
    if r == 2:      # the right kinds of fds, but the capacity headers say 0
        return {"l2e": [{"$fd": fds.memfd(RING_HEADER + 4096, sealed=True)}, {"$fd": fds.eventfd()},
                        {"$fd": fds.eventfd()}],
                "e2l": [{"$fd": fds.memfd(RING_HEADER + 4096, sealed=True)}, {"$fd": fds.eventfd()},
                        {"$fd": fds.eventfd()}]}
    if r == 3:      # real rings, doorbells that are pipes
        ring = ShmRing.create(4096)
        own_rings.append(ring)
        h = ring.handles()
        return {"l2e": [{"$fd": fds.add(os.dup(h[0]))}, {"$fd": fds.pipe()}, {"$fd": fds.pipe()}],
                "e2l": [{"$fd": fds.add(os.dup(h[0]))}, {"$fd": fds.add(os.dup(h[1]))}, {"$fd": fds.devnull()}]}
    if r == 4:
        return {"l2e": [{"$fd": 0}, {"$fd": 1}], "e2l": "x"}
    if r == 5:
        return [1, 2, 3]
    e = fds.eventfd()
    return rng.choice([{"l2e": [{"$fd": e}] * 3, "e2l": []},                       # one fd used three times
                       {"l2e": [{"$fd": 40}, {"$fd": 41}, {"$fd": 42}], "e2l": None}])


def _valid_rings(own_rings: list, fds: _Fds) -> dict:
    a, b = ShmRing.create(4096), ShmRing.create(4096)
    own_rings += [a, b]
    return {"l2e": [{"$fd": fds.add(os.dup(x))} for x in a.handles()],
            "e2l": [{"$fd": fds.add(os.dup(x))} for x in b.handles()]}


def _unix_scenario(rng: random.Random, i: int):
    """One connection: packet builders (each returns (bytes, _Fds, raw)), the
    rings to close afterwards, and whether a packet follows a complete handshake."""
    session = f"fz-unix-{i}"
    nbytes = BlockLayout(POOL_BLOCKS, BLOCK, HIDDEN, BF16, 16).nbytes
    hello = P.encode(P.Register(P.Role.LANGUAGE, session, "node", os.getpid(), 0, "",
                                {"phase": "hello", "layout": _layout(), "offer": ["shm"]}))
    r = rng.random()
    own_rings: list = []

    def plain(data):
        return lambda: (data, _Fds(), False)

    if r < 0.2:
        return [plain(_garbage(rng)) for _ in range(rng.randrange(1, 4))], own_rings, False
    if r < 0.4:
        return [plain(_mutate(rng, hello if rng.random() < 0.7 else _encode(_msg(rng, session))))
                for _ in range(rng.randrange(1, 3))], own_rings, False
    if r < 0.5:
        return [plain(_encode(P.Register(P.Role.LANGUAGE, session, "node", 1, 0, "", _odd_desc(rng)))),
                plain(_raw_register(_raw_blob(rng), session=session))], own_rings, False
    if r < 0.55:
        return [plain(_encode(_msg(rng, session)))], own_rings, False   # not a Register
    if r < 0.6:            # over the packet limit, or too many fds
        if rng.random() < 0.5:
            big = rng.randbytes(unix.MAX_PACKET + rng.randrange(1, 30000))
            return [lambda: (big, _Fds(), True)], own_rings, False

        extra = rng.randrange(1, 8)

        def many_fds():
            f = _Fds()
            for _ in range(unix.MAX_FDS + extra):
                f.devnull()
            return hello, f, True
        return [many_fds], own_rings, False
    if r < 0.63:           # several hellos on one connection
        return [plain(hello), plain(hello), plain(hello)], own_rings, False

    def pool(valid: bool):
        sub = rng.randrange(1 << 32)          # the packet is built when sent, from its own seed

        def build():
            rng = random.Random(sub)
            f = _Fds()
            # the pool, the rings or both hostile (the pool is opened, and mapped, first)
            target = "none" if valid else rng.choices(["pool", "rings", "both"], [6, 3, 1])[0]
            if target in ("pool", "both"):
                pool_desc = _hostile_pool(rng, f, nbytes)
            else:
                pool_desc = {"fd": {"$fd": f.memfd(nbytes, sealed=True)}, "nbytes": nbytes, "layout": _layout()}
            if target in ("rings", "both"):
                rings = _hostile_rings(rng, f, own_rings)
            else:
                rings = _valid_rings(own_rings, f)
            desc = {"phase": "pool", "pool": pool_desc, "rings": rings}
            if not valid:
                for _ in range(rng.choice([0, 0, 0, 1, 5])):           # fds nobody references
                    f.pipe() if rng.random() < 0.5 else f.eventfd()
            transport = "shm" if valid or rng.random() < 0.9 else rng.choice(["mooncake", "cuda_ipc", "", "x"])
            return P.encode(P.Register(P.Role.LANGUAGE, session, "node", os.getpid(), 0, transport, desc)), f, True
        build.valid = valid
        return build

    if r < 0.985:          # hello, then a hostile pool
        steps = [plain(hello), pool(False)]
        if rng.random() < 0.1:
            steps = [pool(False)]                                        # no hello first
        return steps, own_rings, False
    # a complete valid handshake, then a hang-up or a packet on the established socket
    steps = [plain(hello), pool(True)]
    post_ready = rng.random() < 0.5
    if post_ready:
        steps.append(plain(_garbage(rng) or b"x"))
    return steps, own_rings, post_ready


def _drain(s: socket.socket, timeout: float, until_ready: bool = False) -> str:
    """Read the encoder's replies until it hangs up ('eof'), until its 'ready'
    ('ready', with ``until_ready``), or until ``timeout`` passes ('timeout')."""
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return "timeout"
        s.settimeout(left)
        try:
            data, fds = unix.recv(s)
        except socket.timeout:
            return "timeout"
        except OSError:
            return "eof"
        unix.close_all(fds)
        if not data:
            return "eof"
        if until_ready:
            try:
                msg = P.decode(data)
            except P.ProtocolError:
                continue
            if isinstance(msg, P.Register) and msg.desc.get("phase") == "ready":
                return "ready"


def _fuzz_unix(name: bytes, n: int, seed: int, deadline: float, progress: list, slot: int, stats: dict):
    """Each scenario on its own connection: its packets, then (for the complete
    handshakes) the encoder's 'ready' and maybe a stray packet, then our write
    side is shut so the encoder reads every packet, answers and hangs up."""
    rng = random.Random(seed)
    sent = 0
    i = 0
    while sent < n and time.monotonic() < deadline:
        steps, own_rings, post_ready = _unix_scenario(rng, i)
        valid = len(steps) >= 2 and getattr(steps[1], "valid", False)
        i += 1
        try:
            s = unix.connect(name, 2.0)
        except OSError:
            stats["connect_errors"] += 1
            time.sleep(0.01)
            continue
        try:
            for k, build in enumerate(steps):
                if sent >= n:
                    break
                if valid and k == 2:
                    if _drain(s, 5.0, until_ready=True) != "ready":
                        stats["valid_refused"] += 1
                        break
                    stats["valid_completed"] += 1
                data, f, raw = build()
                try:
                    if f.fds:
                        socket.send_fds(s, [data], f.fds)
                    elif raw:
                        s.send(data)
                    else:
                        unix.send(s, data)
                except OSError:
                    stats["send_errors"] += 1         # the encoder hung up on an earlier packet: fine
                    break
                finally:
                    f.close()
                sent += 1
                progress[slot] = sent
                stats["post_ready"] += valid and k == 2
            if valid and len(steps) == 2:
                if _drain(s, 5.0, until_ready=True) == "ready":
                    stats["valid_completed"] += 1
            else:
                try:
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                if _drain(s, 5.0) == "timeout":
                    stats["drain_timeouts"] += 1
        finally:
            s.close()
            for ring in own_rings:
                ring.close()
    return sent


# ---------------------------------------------------------------- (c) the buggy peer's ring
def _ring_frame(rng: random.Random, session: str, big: bool) -> bytes:
    if big:
        return P.encode(P.Init(_room(rng), "e", 0, session, _blocks(rng, big=True), 1, 100_000 * BLOCK))
    r = rng.random()
    if r < 0.2:
        return _garbage(rng)
    if r < 0.5:
        return _mutate(rng, _encode(_msg(rng, "fz-wrong-session")))
    if r < 0.75:               # the right session, one bad field: rejected one by one
        blocks = tuple(rng.sample(range(POOL_BLOCKS), rng.randrange(1, 9)))
        alloc = len(blocks) * BLOCK
        bad = rng.randrange(3)
        if bad == 0:
            blocks += (POOL_BLOCKS + rng.randrange(1 << 20),)             # out of range
            alloc += BLOCK
        elif bad == 1:
            alloc += rng.choice([1, -1, BLOCK, -BLOCK // 2])               # size mismatch
        else:
            blocks = ()                                                    # empty (does not decode)
        f = dict(room=_room(rng), endpoint="e", dst_port=0, session_id=session, dst_blocks=blocks,
                 required_dst_info_num=1, allocated_tokens=max(alloc, 1), nonce=rng.randrange(1 << 64))
        return _encode(P.Init(**f) if rng.random() < 0.6 else P.Resume(**f, sent_tokens=BLOCK * rng.randrange(1, 9)))
    if r < 0.85:
        return _encode(P.Abort(_room(rng), "fuzz"))
    kind = rng.choice([P.StatusMsg(_room(rng), Status.Success, 1, 1, 1, 1), P.Progress(_room(rng), 1, 1),
                       P.Heartbeat(1, 1), P.Register(P.Role.LANGUAGE, session, "n", 1, 0, "shm", {"phase": "hello"})])
    return _encode(kind)


def _fuzz_ring(buggy: LanguageEndpoint, n: int, seed: int, n_valid: int, deadline: float, progress: list, slot: int,
               stats: dict):
    rng = random.Random(seed)
    sent = 0
    valid_at = {int(k * n / max(n_valid, 1)) + 7 for k in range(n_valid)} if n_valid else set()
    big_at = {n // 5, 2 * n // 5, 3 * n // 5, 4 * n // 5} if n >= 1000 else {n // 2}
    opened = []
    i = 0
    while sent < n and time.monotonic() < deadline:
        ch = buggy.channel
        link = buggy._encoder().link
        if ch is None or link is None or not link.alive or getattr(ch, "closed", False):
            stats["reconnects"] += 1
            if stats["reconnects"] > MAX_BUGGY_SESSIONS:
                raise AssertionError(f"the buggy peer reconnected {stats['reconnects']} times")
            buggy.connect(timeout=20)
            continue
        session = link.session_id
        if i in valid_at:         # a valid INIT of a room that never comes, half of them aborted later
            room = f"fzv-{i}"
            data = P.encode(P.Init(room, "e", 0, session, (rng.randrange(POOL_BLOCKS),), 1, BLOCK, i + 1))
            opened.append(room)
            stats["valid_inits"] += 1
        elif opened and rng.random() < 0.004:
            data = P.encode(P.Abort(opened.pop(rng.randrange(len(opened))), "fuzz abort"))
        else:
            data = _ring_frame(rng, session, i in big_at)
        i += 1
        try:
            ch.send_bytes(data)
        except PeerError:
            stats["send_errors"] += 1
            continue
        sent += 1
        progress[slot] = sent
    return sent


# ---------------------------------------------------------------- the test
def _run_thread(name, fn, results, errors, *args):
    def body():
        try:
            results[name] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            import traceback
            errors.append(f"{name}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    t = threading.Thread(target=body, name=f"fuzz-{name}", daemon=True)
    t.start()
    return t


def _legit(lang, enc, data, rooms, failures, timeout=60.0):
    for room, tokens in rooms:
        lang.request(room)
        enc.send(room, tokens)
    for room, tokens in rooms:
        st = lang.wait(room, timeout)
        if st is not Status.Success:
            failures.append((room, tokens, st.name, lang.failure_reason(room)))
            if st.terminal:
                try:
                    lang.result(room)
                except Exception:
                    pass
            else:
                lang.abort(room, "test timeout")
            continue
        res = lang.result(room)
        if res.total_tokens != tokens or not data.verify(room, res):
            failures.append((room, tokens, "Success", "not bit-exact"))


def _settle(enc, quiet_s=1.0, timeout=20.0):
    """Wait until the encoder's counters stop moving (it processed what was queued)."""
    last, t_last, deadline = None, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = enc.stats()[0]
        snap = tuple(sorted(st.items()))
        if snap != last:
            last, t_last = snap, time.monotonic()
        elif time.monotonic() - t_last >= quiet_s:
            return st
        time.sleep(0.2)
    return enc.stats()[0]


def _diag(log_path) -> str:
    """The encoder's log in short: its most frequent lines and anything unlevelled (tracebacks)."""
    try:
        summary = _log_summary(_read_log(log_path))
    except OSError as e:
        return f"(no encoder log: {e})"
    top = "\n".join(f"{n:6d}  {t}" for t, n in summary["templates"].most_common(15))
    return f"encoder log, most frequent:\n{top}\nunlevelled lines:\n" + "\n".join(summary["other"][-60:])


def _own_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_fuzz_10000_frames_while_serving_a_legitimate_rank(tmp_path, monkeypatch):
    t_start = time.monotonic()
    cfg = make_config("shm", hidden_size=HIDDEN, block_size=BLOCK, pool_blocks=POOL_BLOCKS, auth_key=KEY,
                      heartbeat_interval=0.5, peer_timeout=5.0, request_timeout=60.0, handshake_timeout=10.0)
    data = SyntheticData(HIDDEN, "bf16", MAX_T, seed=SEED & 0xFFFF)
    log_path = tmp_path / "encoder.log"
    monkeypatch.setattr(harness, "_encoder_child", functools.partial(_logged_encoder_child, str(log_path)))
    keys = auth.keys_for(cfg)
    own_fds0 = None
    tokens = image_token_counts(N_LEGIT, cfg.default_allocate_tokens, BLOCK, seed=SEED, max_tokens=MAX_T)
    legit_rooms = [(f"legit-{k:03d}", t) for k, t in enumerate(tokens)]
    failures: list = []
    errors: list = []
    results: dict = {}
    threads: list = []
    ustats, rstats = collections.Counter(), collections.Counter()
    enc = lang = buggy = None
    try:
        enc = EncoderProcess(cfg, data_spec=(HIDDEN, "bf16", MAX_T, SEED & 0xFFFF, "cpu"))
        pid = enc.proc.pid
        # process-lifetime fds (multiprocessing's resource tracker pipe, the ZeroMQ context's
        # io thread and reaper) exist from here on: they are not leaks
        zmq.Context.instance().socket(zmq.DEALER).close(linger=0)
        time.sleep(0.1)
        own_fds0 = _own_fds()
        lang = LanguageEndpoint(cfg)
        buggy = LanguageEndpoint(cfg, tp_rank=1)
        assert lang.channel.kind == "shm-ring" and buggy.channel.kind == "shm-ring"
        name = unix.socket_name(enc.address)

        # ---- warm-up: legitimate traffic and a little of each fuzz surface.  The first bad
        # frame (always logged) is a hello whose 300 kB "layout" must not be copied into the log
        _zmq_once(enc.address, keys, _raw_register(json.dumps({"phase": "hello", "layout": "L" * 300_000,
                                                               "offer": ["shm"]}).encode(), session="fz-first"))
        _legit(lang, enc, data, [(f"warm-{k}", t) for k, t in enumerate((1, 1025, 3077, 5000))], failures)
        deadline = time.monotonic() + 60
        prog = [0, 0, 0]
        _fuzz_zmq(enc.address, keys, N_WARMUP, SEED + 1, 50, deadline, prog, 0)
        _fuzz_unix(name, N_WARMUP, SEED + 2, deadline, prog, 1, collections.Counter())
        _fuzz_ring(buggy, N_WARMUP, SEED + 3, 0, deadline, prog, 2, collections.Counter())
        _legit(lang, enc, data, [(f"warm2-{k}", t) for k, t in enumerate((64, 2048))], failures)
        assert not failures, f"warm-up rooms failed: {failures}"
        st0 = _settle(enc)
        base = _proc_status(pid)
        log_off = log_path.stat().st_size if log_path.exists() else 0
        resumes0 = lang.stats["resumes"]

        # ---- 10,000 frames on three surfaces while the legitimate rank is served
        progress = [0, 0, 0]
        deadline = time.monotonic() + FUZZ_DEADLINE_S
        t_fuzz = time.monotonic()
        threads = [
            _run_thread("zmq", _fuzz_zmq, results, errors, enc.address, keys, N_ZMQ, SEED + 10, 1000, deadline,
                        progress, 0),
            _run_thread("unix", _fuzz_unix, results, errors, name, N_UNIX, SEED + 20, deadline, progress, 1, ustats),
            _run_thread("ring", _fuzz_ring, results, errors, buggy, N_RING, SEED + 30, N_VALID_BUGGY, deadline,
                        progress, 2, rstats),
        ]
        batches = [legit_rooms[k:k + LEGIT_BATCH] for k in range(0, N_LEGIT, LEGIT_BATCH)]
        for b, batch in enumerate(batches):
            # spread the legitimate rooms over the fuzz: batch b starts at b/len(batches) of the frames
            target = b * N_FRAMES // len(batches)
            while sum(progress) < target and any(t.is_alive() for t in threads) and time.monotonic() < deadline:
                time.sleep(0.005)
            assert enc.proc.is_alive(), f"the encoder died (exit code {enc.proc.exitcode})\n{_diag(log_path)}"
            _legit(lang, enc, data, batch, failures)
        for t in threads:
            t.join(timeout=max(1.0, deadline - time.monotonic() + 10))
        fuzz_s = time.monotonic() - t_fuzz
        assert not any(t.is_alive() for t in threads), "a fuzz thread did not finish"
        assert not errors, "\n".join(errors) + "\n" + _diag(log_path)
        sent = (results.get("zmq", 0), results.get("unix", 0), results.get("ring", 0))
        assert sent == (N_ZMQ, N_UNIX, N_RING), f"frames sent {sent} of {(N_ZMQ, N_UNIX, N_RING)} in {fuzz_s:.0f}s"

        # ---- the legitimate rank: every room, bit for bit
        assert not failures, f"{len(failures)} legitimate rooms failed: {failures[:10]}\n{_diag(log_path)}"
        assert lang.stats["resumes"] > resumes0, "the mix needed resumes"

        buggy.close()
        buggy = None
        assert enc.proc.is_alive(), f"the encoder died (exit code {enc.proc.exitcode})\n{_diag(log_path)}"
        _legit(lang, enc, data, [("legit-final", 3077)], failures)
        assert not failures, f"the room after the fuzz failed: {failures}\n{_diag(log_path)}"
        st1 = _settle(enc)
        assert enc.proc.is_alive()

        # ---- resources of the encoder
        deadline2 = time.monotonic() + 10
        while True:
            after = _proc_status(pid)
            if (after["fds"] - base["fds"] <= FD_BOUND and after["threads"] - base["threads"] <= THREAD_BOUND) \
                    or time.monotonic() > deadline2:
                break
            time.sleep(0.2)
        raw = _read_log(log_path, log_off)
        summary = _log_summary(raw)
        longest = _log_summary(_read_log(log_path))["longest"]       # the warm-up's lines too
        report = (f"fuzz {fuzz_s:.1f}s, RSS {base['rss'] / 2**20:.1f} -> {after['rss'] / 2**20:.1f} MiB "
                  f"(+{(after['rss'] - base['rss']) / 2**20:.1f}), fds {base['fds']} -> {after['fds']}, "
                  f"threads {base['threads']} -> {after['threads']}, log lines WARNING+ {summary['bad']} "
                  f"{dict(summary['levels'])}, other {len(summary['other'])}, {summary['bytes']} bytes "
                  f"(longest {longest}); encoder stats delta "
                  f"{ {k: st1.get(k, 0) - st0.get(k, 0) for k in sorted(set(st1) | set(st0))} }; "
                  f"unix {dict(ustats)}, ring {dict(rstats)}")
        print(report)
        top = "\n".join(f"{n:6d}  {t}" for t, n in summary["templates"].most_common(15))
        print(top)
        tracebacks = [x for x in summary["other"] if "Traceback" in x]
        failed_rooms = st1.get("failed", 0) - st0.get("failed", 0)
        violated = [text for ok, text in [
            (after["rss"] - base["rss"] <= RSS_BOUND, f"RSS grew by more than {RSS_BOUND >> 20} MiB"),
            (after["fds"] - base["fds"] <= FD_BOUND, f"open fds grew by more than {FD_BOUND}"),
            (after["threads"] - base["threads"] <= THREAD_BOUND, f"threads grew by more than {THREAD_BOUND}"),
            (not tracebacks, f"{len(tracebacks)} tracebacks in the log"),
            (summary["bad"] <= LOG_LINE_BOUND, f"{summary['bad']} WARNING+ lines > {LOG_LINE_BOUND}"),
            (longest <= LOG_LINE_LENGTH_BOUND, f"a log line of {longest} bytes > {LOG_LINE_LENGTH_BOUND}"),
            (summary["bytes"] <= LOG_BYTES_BOUND, f"{summary['bytes']} bytes of log > {LOG_BYTES_BOUND}"),
            (failed_rooms <= N_VALID_BUGGY, f"{failed_rooms} rooms failed, > the buggy peer's {N_VALID_BUGGY}"),
        ] if not ok]
        assert not violated, "; ".join(violated) + f"\n{report}\nmost frequent:\n{top}\n" + "\n".join(
            summary["other"][:60])
        assert rstats["valid_inits"] == N_VALID_BUGGY
        assert time.monotonic() - t_start < 300
    finally:
        for t in threads:
            t.join(timeout=30)
        if buggy is not None:
            buggy.close()
        if lang is not None:
            lang.close()
        if enc is not None:
            enc.close()
        # no reference to the pools (mappings, and their fds) survives in a kept traceback
        enc = lang = buggy = None
        deadline3 = time.monotonic() + 5
        while own_fds0 is not None and _own_fds() > own_fds0 and time.monotonic() < deadline3:
            time.sleep(0.05)
    assert _own_fds() <= own_fds0, f"this process has {_own_fds() - own_fds0} more fds open than before"


# ---------------------------------------------------------------- the language side's room logic, stateful
import pytest  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule  # noqa: E402

from embresume.channel import Channel  # noqa: E402
from embresume.errors import TransferFailed  # noqa: E402
from embresume.kernels.cpu import scatter_chunk  # noqa: E402
from embresume.planner import plan_chunk  # noqa: E402
from embresume.source import TensorSource, aux_record  # noqa: E402

SM_HIDDEN, SM_BLOCKS, SM_ROOMS, SM_ENCODERS = 64, 8, 5, 2


class _FakeChannel(Channel):
    """What the language side sends to a fake encoder, recorded (no I/O)."""

    kind = "fake"

    def __init__(self):
        super().__init__()
        self.sent: list = []
        self.closed = False

    def send_bytes(self, data: bytes) -> None:
        if self.closed:
            raise PeerError("fake link closed")
        self.sent.append(P.decode(data))

    def close(self) -> None:
        self.closed = True


class LanguageRooms(RuleBasedStateMachine):
    """A LanguageEndpoint driven by hand, no encoder process: its links are
    fake channels, and the rules play the encoders (write chunks into the pool
    by the planner, with or without a PROGRESS first; fail rooms, with or
    without FLAG_BLOCKS_UNSAFE; answer or ignore aborts; send a wrong STATUS),
    the scheduler (requests with and without hints, aborts, collecting and
    releasing results) and the monitor (timeouts, a stuck encoder, link loss,
    reconnection), in any order.

    After every step: each pool block is in exactly one place (the
    allocator's free list, a request, a quarantine, the held blocks, a
    zero-copy result's lease); no request is Success before all its tokens
    landed, and then its result is bit-exact.  At the end, with the results
    released and the endpoint closed, every block is free."""

    EXTRA: dict = {}

    def __init__(self):
        super().__init__()
        self.cfg = make_config("shm", hidden_size=SM_HIDDEN, pool_blocks=SM_BLOCKS, default_allocate_tokens=256,
                               heartbeat_interval=500.0, peer_timeout=1000.0, request_timeout=10000.0,
                               zero_copy=True, extra=dict(self.EXTRA))
        self.data = SyntheticData(SM_HIDDEN, "bf16", 4 * SM_BLOCKS * BLOCK, seed=3)
        self.lang = LanguageEndpoint(self.cfg, connect=False)
        self.lang._start_connecting = lambda enc: None      # the rules bring links up
        self.addrs = [f"tcp://127.0.0.1:{9 + i}" for i in range(SM_ENCODERS)]
        self.encs = [self.lang._encoder(a) for a in self.addrs]
        self.links = [None] * SM_ENCODERS
        self.asked: dict = {}           # (encoder, room) -> the INIT/RESUME it has not answered
        self.chunks: dict = {}          # (encoder, room) -> chunks written
        self.aborted: list = [set() for _ in range(SM_ENCODERS)]
        self.total: dict = {}
        self.results: list = []

    # -- helpers
    def _pump(self) -> None:
        """Read what the language side sent on each live link."""
        for i, link in enumerate(self.links):
            if link is None:
                continue
            sent, link.channel.sent = link.channel.sent, []
            for m in sent:
                if isinstance(m, (P.Init, P.Resume)):
                    self.asked[(i, m.room)] = m
                elif isinstance(m, P.Abort):
                    self.asked.pop((i, m.room), None)
                    self.aborted[i].add(m.room)

    def _deliver(self, i: int, msg) -> None:
        link = self.links[i]
        if link is not None and self.encs[i].link is link:
            self.lang._on_message(self.encs[i], msg)
        self._pump()

    def _up(self, i: int) -> None:
        from embresume.language import _Link
        lang, enc = self.lang, self.encs[i]
        link = _Link(_FakeChannel(), None, "shm", 0, False, f"fake-{i}-{enc.connections}")
        with lang._lock:
            enc.link, enc.state, enc.reason, enc.transport = link, "up", "", "shm"
            enc.connections += 1
            enc.connected.set()
            self.links[i] = link
            self.asked = {k: v for k, v in self.asked.items() if k[0] != i}
            self.aborted[i] = set()
            lang._run(lang._rooms.connected(enc.address, link.session_id))
        self._pump()

    # -- rules
    @initialize()
    def connect_all(self):
        for i in range(SM_ENCODERS):
            self._up(i)

    @rule(room=st.integers(0, SM_ROOMS - 1), i=st.integers(0, SM_ENCODERS - 1),
          tokens=st.integers(1, 3 * SM_BLOCKS * BLOCK), hint=st.booleans())
    def request(self, room, i, tokens, hint):
        lang = self.lang
        if room in lang._reqs or any(room in e.quarantine or room in e.held for e in self.encs):
            return
        lang.request(room, encoder=self.addrs[i], expected_tokens=tokens if hint else None)
        self.total[room] = tokens
        self._pump()

    @precondition(lambda self: self.asked)
    @rule(data=st.data(), progress=st.booleans())
    def encoder_writes_a_chunk(self, data, progress):
        key = data.draw(st.sampled_from(sorted(self.asked, key=repr)))
        i, room = key
        m = self.asked.pop(key)
        total = self.total[room]
        sent = m.sent_tokens if isinstance(m, P.Resume) else 0
        plan = plan_chunk(total, sent, m.allocated_tokens, BLOCK, m.dst_blocks)
        e, f, mr, d = self.data.sample(room, total)
        src = TensorSource(e, f, mr, d)
        seq = self.chunks.get(key, 0) + 1
        self.chunks[key] = seq
        aux = torch_aux(total, d, self.cfg.aux_ints) if seq == 1 else None
        nblocks = plan.src_block_end - plan.src_block_start
        if progress and nblocks >= 2:
            k = data.draw(st.integers(1, nblocks - 1))
            scatter_chunk(self.lang.pool, plan.dst_blocks[:k], src, plan.src_block_start, k * BLOCK, aux)
            self._deliver(i, P.Progress(room, seq, k * BLOCK))
        scatter_chunk(self.lang.pool, plan.dst_blocks, src, plan.src_block_start, plan.tokens, aux)
        status = Status.Transferring if plan.partial else Status.Success
        self._deliver(i, P.StatusMsg(room, status, seq, plan.sent_tokens_after, plan.tokens, total))

    @precondition(lambda self: self.asked)
    @rule(data=st.data(), unsafe=st.booleans())
    def encoder_fails_a_room(self, data, unsafe):
        i, room = data.draw(st.sampled_from(sorted(self.asked, key=repr)))
        self.asked.pop((i, room))
        self._deliver(i, P.StatusMsg(room, Status.Failed, reason="encoder failed it",
                                     flags=P.FLAG_BLOCKS_UNSAFE if unsafe else 0))

    @precondition(lambda self: self.asked)
    @rule(data=st.data())
    def encoder_sends_a_wrong_status(self, data):
        i, room = data.draw(st.sampled_from(sorted(self.asked, key=repr)))
        self._deliver(i, P.StatusMsg(room, Status.Transferring, 99, 1, 1, 1))

    @rule(i=st.integers(0, SM_ENCODERS - 1))
    def encoder_acknowledges_aborts(self, i):
        for room in sorted(self.aborted[i], key=repr):
            self.aborted[i].discard(room)
            self._deliver(i, P.StatusMsg(room, Status.Failed, reason="abort confirmed", flags=P.FLAG_ABORT_ACK))

    @rule(room=st.integers(0, SM_ROOMS - 1))
    def scheduler_aborts(self, room):
        self.lang.abort(room, "scheduler gave up")
        self._pump()

    @rule(room=st.integers(0, SM_ROOMS - 1))
    def request_times_out(self, room):
        req = self.lang._reqs.get(room)
        if req is not None:
            req.deadline = 0.0
        self.lang._monitor_once()
        self._pump()

    @rule(i=st.integers(0, SM_ENCODERS - 1))
    def encoder_is_stuck_past_the_quarantine_timeout(self, i):   # or its held blocks are
        with self.lang._lock:
            for parked in (self.encs[i].rooms.quarantined_at, self.encs[i].rooms.held_at):
                for room in parked:
                    parked[room] = -1e9
        self.lang._monitor_once()
        self._pump()

    @rule(i=st.integers(0, SM_ENCODERS - 1))
    def link_is_lost(self, i):
        link = self.links[i]
        if link is not None:
            self.lang._link_lost(self.encs[i], link, "test: link lost")
            self.links[i] = None

    @rule(i=st.integers(0, SM_ENCODERS - 1))
    def reconnect(self, i):
        if self.links[i] is None:
            self._up(i)

    @rule(room=st.integers(0, SM_ROOMS - 1), keep=st.booleans())
    def collect(self, room, keep):
        req = self.lang._reqs.get(room)
        if req is None or not req.tracker.status.terminal or req.copying:
            return
        if req.tracker.status is Status.Failed:
            with pytest.raises(TransferFailed):
                self.lang.result(room)
            return
        res = self.lang.result(room)
        assert res.total_tokens == self.total[room]
        assert self.data.verify(room, res)
        if keep:
            self.results.append(res)
        else:
            res.release()

    @precondition(lambda self: self.results)
    @rule(data=st.data())
    def release_a_result(self, data):
        res = self.results.pop(data.draw(st.integers(0, len(self.results) - 1)))
        res.release()

    # -- invariants
    @invariant()
    def every_block_has_exactly_one_owner(self):
        lang = self.lang
        with lang._lock:
            parts = [list(lang.allocator._free)]
            leases = {}
            for req in lang._reqs.values():
                parts.append(list(req.blocks))
                if req.result is not None and req.result._lease is not None:
                    leases[id(req.result)] = getattr(req.result._lease, "blocks", [])
            for res in self.results:
                if res._lease is not None:
                    leases[id(res)] = getattr(res._lease, "blocks", [])
            parts.extend(leases.values())
            for e in self.encs:
                parts.extend(list(b) for b in e.quarantine.values())
                parts.extend(list(b) for b in e.held.values())
            owned = sorted(b for p in parts for b in p)
            lang._rooms.check_ledger()          # the machine's own ledger agrees
        assert owned == list(range(SM_BLOCKS)), owned

    @invariant()
    def no_encoder_holds_more_than_its_share(self):
        lang = self.lang
        if lang._share_limit:
            with lang._lock:
                assert all(lang._rooms.charged(e.rooms) <= lang._share_limit for e in self.encs)

    @invariant()
    def no_result_before_all_its_tokens_landed(self):
        for room, req in list(self.lang._reqs.items()):
            if req.tracker.status is Status.Success:
                assert req.result is not None and req.result.total_tokens == self.total[room]
                assert req.sent_tokens == self.total[room]
            else:
                assert req.result is None

    def teardown(self):
        try:
            for res in self.results:
                res.release()
            for req in list(self.lang._reqs.values()):    # results nobody collected
                if req.result is not None:
                    req.result.release()
            self.lang.close()
            assert self.lang.allocator.free_blocks == SM_BLOCKS
        finally:
            self.lang.close()


def torch_aux(total: int, delta: int, aux_ints: int):
    import torch
    return torch.from_numpy(aux_record(total, delta, aux_ints))


class LanguageRoomsCapped(LanguageRooms):
    """The same with each encoder capped at half of the pool (max_encoder_share)."""

    EXTRA = {"max_encoder_share": 0.5}


TestLanguageRooms, TestLanguageRoomsCapped = state_machine_tests(LanguageRooms, LanguageRoomsCapped, examples=100,
                                                                 steps=50)
