"""The encoder endpoint: finished embeddings in, chunks out.

``send`` registers a finished embedding for a room; INIT/RESUME messages from
the language ranks say where to write.  For each chunk the planner decides
what fits, the transport writes it, and only then the chunk's STATUS
(Transferring or Success) is posted — per rank, in order, on the rank's own
worker thread, so one slow rank never delays another's control messages.

Rules (docs/design.md):
1. a room's source and total_tokens are kept until Success/Failed/timeout, so
   every RESUME re-triggers a transfer;
2. allocated_tokens must equal ``len(dst_blocks) * block_size`` (checked);
3. aux is written only into the first block of a rank's first chunk;
4. INITs for rooms already Transferring/Success are ignored, and so is a
   replayed INIT (same session, room and nonce) of a room that finished; a new
   nonce for a finished room is a new use of the key (either order of send and
   request works);
5. with ``required_dst_info_num`` ranks, a chunk round starts when every rank
   that is not done has asked for it; each rank receives a full copy.

Every index and count a peer sends is bounds-checked; a bad message fails
that one room (STATUS Failed to the ranks) and the endpoint keeps serving.

One peer never stalls the others (docs/design.md, section 8): sends never wait
for a peer (a frame that does not fit its ring waits in that link's queue), a
peer whose ring stays full, that floods no-op frames or that sends more than
its session's bound of rooms and blocks is refused or disconnected, and a
room's ranks all belong to the TP group of its first INIT.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import zmq

from . import auth, metrics
from .logutil import RateLimitedLog, clip
from . import protocol as P
from .blocks import BlockAllocator, BlockLayout, BlockPool
from .channel import Channel, RateBucket, ZmqChannel, ZmqHub, noop_bucket
from .ipc import unix
from .config import as_config, Config
from .errors import (BlockSizeMismatch, ConfigError, EmbResumeTimeout, InvalidArgument, PeerError, ProtocolError,
                     TransportUnavailable)
from .node import node_id, pid_alive as _pid_alive
from .planner import ChunkPlan, check_block_size, plan_chunk
from .source import BlockSource, TensorSource, aux_record
from .status import Status, StatusTracker
from .transport import select
from .transport.base import PeerPool, Transport

log = logging.getLogger("embresume.encoder")
#: what peers cause (bad frames, rejected rooms, refusals): a bounded number of lines
plog = RateLimitedLog(log)

FINISHED_MEMORY = 65536
#: a chunk up to this many embedding bytes is written by the thread that
#: registered it (send/send_tensors) when its INIT is already here
INLINE_WRITE_BYTES = 256 << 10
#: pipelined chunks (Config.pipeline_bytes): a chunk is cut into about this many
#: pieces, none smaller than MIN_PIECE_BYTES of embeddings, none larger than pipeline_bytes
PIPELINE_PIECES = 4
MIN_PIECE_BYTES = 2 << 20
#: hellos whose pool description has not come yet
MAX_PENDING_HANDSHAKES = 256
#: per language session (one rank's connection): rooms it is a rank of, and
#: destination blocks it has asked to be written and not yet been answered
#: for (at most its pool's blocks: an honest rank cannot have more).  An INIT
#: past either bound is refused to that rank alone (STATUS Failed).
MAX_LIVE_ROOMS_PER_SESSION = 16384
MAX_LIVE_BLOCKS_PER_SESSION = 1 << 20
#: refusals (a Bye) to tcp peers that are not registered (a keyless hello, an
#: undecodable frame): at most REFUSAL_RATE a second after a burst of
#: REFUSAL_BURST, for the whole endpoint; the rest are dropped and counted
REFUSAL_RATE = 100.0
REFUSAL_BURST = 200.0
#: the longest TP group identity a rank may present
MAX_GROUP = 256
#: language sessions (ranks' connections) one encoder serves at once; each has its
#: own worker and writer threads, rings and pool mapping: a hello past it is refused
MAX_SESSIONS = 1024
#: the largest control frame accepted from any peer (an INIT of 1M blocks, a handshake description)
MAX_FRAME = max(P.MAX_BLOB, 4 << 20) + 64 * 1024
_INT32 = (-(1 << 31), (1 << 31) - 1)


class _Peer:
    """One connected language rank."""

    def __init__(self, session_id: str, tp_rank: int, pid: int, transport: Transport, pool: PeerPool,
                 channel: Channel, pid_check: bool, conn: Optional[unix.Conn] = None, group: str = "",
                 heartbeat_interval: float = 0.5):
        self.session_id = session_id
        #: the TP group (engine instance) this rank says it belongs to: a room's
        #: ranks are all of one group
        self.group = group
        #: live rooms it is a rank of, blocks of its pool it asked for and awaits
        self.live_rooms = 0
        self.live_blocks = 0
        self.noop = noop_bucket(heartbeat_interval)
        #: the Unix-socket connection of a same-host peer (its EOF: the peer is gone)
        self.conn = conn
        self.tp_rank = tp_rank
        self.pid = pid
        self.transport = transport
        self.pool = pool
        self.channel = channel
        self.pid_check = pid_check
        self.last_seen = time.monotonic()
        self.busy = False
        self.alive = True
        self.bad = 0
        self.jobs: "queue.SimpleQueue[Optional[Callable[[], None]]]" = queue.SimpleQueue()
        self.worker = threading.Thread(target=self._work, name=f"embresume-enc-{session_id}", daemon=True)

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:
                log.exception("peer job failed")


@dataclass
class _Rank:
    peer: _Peer
    nonce: int = 0
    dst_blocks: tuple = ()
    allocated_tokens: int = 0
    sent_tokens: int = 0
    chunks: int = 0
    pending: bool = False
    in_flight: bool = False
    done: bool = False
    unsafe: bool = False
    failed_msg: Optional[P.StatusMsg] = None
    counted: int = 0            # dst blocks counted in peer.live_blocks (asked for, not yet answered)


@dataclass
class _Room:
    room: P.Room
    deadline: float
    tracker: StatusTracker = field(default_factory=StatusTracker)
    source: object = None
    required: int = 0
    ranks: dict = field(default_factory=dict)
    on_done: Optional[Callable[[P.Room, Status], None]] = None
    own_blocks: Optional[list] = None
    reason: str = ""
    t0: float = field(default_factory=time.monotonic)
    group: Optional[str] = None     # the TP group of its ranks (set by the first INIT)


def _reply(transport: str, desc: dict) -> P.Register:
    """The encoder's handshake message (hello / retry / ready)."""
    return P.Register(P.Role.ENCODER, "encoder", node_id(), os.getpid(), 0, transport, desc)


class _HsZmq:
    """A handshake that came over the ZeroMQ (tcp) socket: a peer elsewhere."""

    same_host = False
    conn = None
    pid = 0

    def __init__(self, endpoint: "EncoderEndpoint", ident: bytes):
        self.key = ident
        self._endpoint = endpoint

    def reply(self, msg: P.Message) -> None:
        self._endpoint._hub.send(self.key, P.encode(msg))


class _HsUnix:
    """A handshake that came over the Unix socket: a peer on this host whose
    uid the kernel vouched for."""

    same_host = True

    def __init__(self, conn: unix.Conn):
        self.key = self.conn = conn
        self.pid = conn.pid

    def reply(self, msg: P.Message) -> None:
        self.conn.send(P.encode(msg))


class EncoderEndpoint:
    """The encoder's side.  Binds ``config.encoder_endpoint`` (ZeroMQ) for the
    handshakes and control messages of peers on other hosts (with an
    ``auth_key`` only), and the abstract Unix socket derived from it
    (:func:`embresume.ipc.unix.socket_name`) for peers on this host.

    ``pool_blocks`` > 0 creates a local block pool (``self.pool``) the model
    can write into; :meth:`send` then takes its block indices.  Tensors from
    the model can be sent directly with :meth:`send_tensors` (no staging copy).
    """

    def __init__(self, config: Optional[Config] = None, *, pool_blocks: int = 0, bind: Optional[str] = None):
        self.config = as_config(config, "EncoderEndpoint")
        c = self.config
        self.pool: Optional[BlockPool] = None
        self.allocator: Optional[BlockAllocator] = None
        if pool_blocks:
            layout = BlockLayout(pool_blocks, c.block_size, c.hidden_size, c.dtype, c.aux_ints)
            self.pool = BlockPool.create(layout, c.device)
            self.allocator = BlockAllocator(pool_blocks, c.block_size)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)      # a room became terminal
        self._tls = threading.local()
        self._rooms: dict[P.Room, _Room] = {}
        self._finished: "collections.OrderedDict[P.Room, Status]" = collections.OrderedDict()
        #: (session, room, nonce) of INITs whose room finished: a replay is a duplicate
        self._finished_inits: "collections.OrderedDict[tuple, None]" = collections.OrderedDict()
        self._peers: dict[str, _Peer] = {}
        self._zmq_peers: dict[bytes, _Peer] = {}
        self._handshakes: dict[bytes, dict] = {}
        self._refusals = RateBucket(REFUSAL_RATE, REFUSAL_BURST)
        self._transports = select.TransportSet(self.config)
        self._closed = False
        self._stop = threading.Event()
        self.stats = collections.Counter()
        #: process-wide counters and histograms (embresume.metrics)
        self.metrics = metrics.StandardMetrics(metrics.REGISTRY, role="encoder")
        address = bind or c.encoder_endpoint
        keys = auth.keys_for(c)
        if keys is None and not auth.is_loopback(address):
            raise ConfigError(f"refusing to bind {address} without an auth_key: anyone who reaches it could "
                              "read the embeddings. Set Config(auth_key=...) or EMBRESUME_AUTH_KEY on both sides, "
                              "or bind a loopback address")
        self._keys = keys
        self._hub = ZmqHub(zmq.ROUTER, bind=address, on_frames=self._on_frames, name="encoder",
                           on_send_error=self._on_send_error, curve_keys=keys, max_frame=MAX_FRAME)
        self.address = self._hub.address
        self.unix_name = unix.socket_name(self.address)
        try:
            self._unix = unix.Server(self.unix_name, allowed_uids=c.peer_uids, on_packet=self._on_unix_packet,
                                     on_closed=self._on_unix_closed, on_bad=self._on_unix_bad,
                                     on_refused=self._on_unix_refused, max_pending=MAX_PENDING_HANDSHAKES,
                                     pending_timeout=c.handshake_timeout, thread_name="embresume-enc-unix")
        except OSError as e:
            self._hub.close()
            raise ConfigError(f"cannot listen on the same-host handshake socket {unix.display(self.unix_name)} "
                              f"({e.strerror or e}): another encoder of this host (or a squatter) holds it; "
                              f"use another port") from None
        self._monitor = threading.Thread(target=self._monitor_loop, name="embresume-enc-monitor", daemon=True)
        self._monitor.start()

    # ------------------------------------------------------------ public API
    def send_tensors(self, room: P.Room, embeddings: torch.Tensor, fill_ids: torch.Tensor,
                     mrope_positions: torch.Tensor, mrope_delta: int = 0,
                     on_done: Optional[Callable[[P.Room, Status], None]] = None) -> None:
        """Register the model's output for ``room`` (kept, not copied, until done).

        ``room`` is an int, str or bytes key (see :mod:`embresume.protocol`).
        Bad arguments raise :class:`~embresume.errors.InvalidArgument` here,
        before anything is registered."""
        P.check_room(room)
        self._check_delta(mrope_delta)
        self._register(room, self._tensor_source(embeddings, fill_ids, mrope_positions, mrope_delta), on_done, None)

    def _tensor_source(self, embeddings, fill_ids, mrope_positions, mrope_delta) -> TensorSource:
        """``send_tensors``'s arguments checked against the Config, at the call
        (InvalidArgument); the shapes are read once, by TensorSource."""
        for name, t in (("embeddings", embeddings), ("fill_ids", fill_ids), ("mrope_positions", mrope_positions)):
            if not isinstance(t, torch.Tensor):
                raise InvalidArgument(f"{name} must be a torch.Tensor, got {type(t).__module__}.{type(t).__name__}"
                                      + (" (wrap it with torch.from_numpy)" if type(t).__module__ == "numpy" else ""))
        try:
            src = TensorSource(embeddings, fill_ids, mrope_positions, int(mrope_delta))
        except ConfigError as e:
            raise InvalidArgument(str(e)) from None
        c = self.config
        if src.dtype != c.dtype:
            raise InvalidArgument(f"embeddings dtype is {src.dtype}, the Config's dtype is {c.dtype}")
        if src.hidden != c.hidden_size:
            raise InvalidArgument(f"embeddings width is {src.hidden}, the Config's hidden_size is {c.hidden_size}")
        return src

    def send(self, room: P.Room, src_blocks: Sequence[int], total_tokens: int, mrope_delta: int = 0,
             on_done: Optional[Callable[[P.Room, Status], None]] = None, free_blocks: bool = True) -> None:
        """Register an embedding held in blocks of this endpoint's pool.

        With ``free_blocks`` the blocks go back to :attr:`allocator` when the
        room ends (Success, Failed or timeout)."""
        if self.pool is None:
            raise ConfigError("this encoder has no local pool; create it with pool_blocks=N or use send_tensors")
        P.check_room(room)
        self._check_delta(mrope_delta)
        src = BlockSource(self.pool, list(src_blocks), total_tokens, int(mrope_delta))
        self._register(room, src, on_done, list(src_blocks) if free_blocks else None)

    def withdraw(self, room: P.Room) -> bool:
        """Take back an embedding registered with :meth:`send_tensors` or
        :meth:`send` that no language rank has asked for yet: the endpoint
        lets go of it now (its ``on_done`` sees ``Failed``) instead of at
        ``request_timeout``.  Returns False, changing nothing, for a room that
        is unknown, finished, or already asked for (that one runs to its end)."""
        with self._lock:
            r = self._rooms.get(room)
            if r is None or r.source is None or r.ranks:
                return False
            r.reason = "withdrawn by the encoder"
            r.tracker.fail()
            self._finish(r)
            return True

    @staticmethod
    def _check_delta(delta) -> None:
        if isinstance(delta, bool) or not isinstance(delta, int) or not _INT32[0] <= delta <= _INT32[1]:
            raise InvalidArgument(f"mrope_delta must be an int32, got {delta!r}")

    def wait(self, room: P.Room, timeout: Optional[float] = None) -> Status:
        """Block until ``room`` is terminal (Success or Failed) or ``timeout``
        seconds passed; returns its status then (non-terminal on timeout).
        Raises KeyError for a room this endpoint never saw."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                r = self._rooms.get(room)
                if r is None:
                    if room in self._finished:
                        return self._finished[room]
                    raise KeyError(f"unknown room {room!r}")
                if r.tracker.status.terminal:
                    return r.tracker.status
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return r.tracker.status
                self._cond.wait(left)

    def drain(self, timeout: Optional[float] = None) -> None:
        """Block until every room sent so far is terminal (delivered to all its
        ranks, failed or timed out), so that a script may send and then close.
        Raises :class:`~embresume.errors.EmbResumeTimeout` after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                left_rooms = [r.room for r in self._rooms.values() if r.source is not None]
                if not left_rooms:
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise EmbResumeTimeout(f"{len(left_rooms)} sent rooms not delivered within {timeout}s "
                                           f"(e.g. {left_rooms[:5]!r}): no language rank requested them")
                self._cond.wait(left if left is not None else 1.0)

    def allocate(self, tokens: int, room: int) -> list[int]:
        """Blocks of the local pool for an embedding of ``tokens`` tokens."""
        if self.allocator is None:
            raise ConfigError("this encoder has no local pool")
        return self.allocator.allocate(tokens, room)

    def poll(self, room: P.Room) -> Status:
        with self._lock:
            r = self._rooms.get(room)
            if r is not None:
                return r.tracker.status
            if room in self._finished:
                return self._finished[room]
        raise KeyError(f"unknown room {room!r}")

    def peers(self) -> list[dict]:
        with self._lock:
            return [{"session_id": p.session_id, "tp_rank": p.tp_rank, "transport": p.transport.name,
                     "alive": p.alive} for p in self._peers.values()]

    def wait_peers(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if sum(p.alive for p in self._peers.values()) >= n:
                    return
            time.sleep(0.005)
        raise PeerError(f"{n} language ranks did not connect within {timeout}s")

    def _register(self, room: P.Room, src, on_done, own_blocks) -> None:
        t = self._tls
        outer = getattr(t, "jobs", None) is None
        if outer:
            # a small first chunk whose INIT is already here is written by this
            # thread once the lock is released (no hand-off to the peer's worker)
            t.peer, t.jobs = None, []
        try:
            self._register_locked(room, src, on_done, own_blocks)
        finally:
            if outer:
                jobs, t.jobs = t.jobs, None
                for job in jobs:
                    try:
                        job()
                    except Exception:   # _write reports its own failures; this is a bug
                        log.exception("inline write failed")

    def _register_locked(self, room: P.Room, src, on_done, own_blocks) -> None:
        with self._lock:
            if self._closed:
                raise PeerError("endpoint is closed")
            r = self._rooms.get(room)
            if r is None:
                r = _Room(room, time.monotonic() + self.config.request_timeout)
                self._rooms[room] = r
                self._finished.pop(room, None)
            elif r.source is not None:
                raise InvalidArgument(f"room {room!r} already has an embedding in flight")
            r.source, r.on_done, r.own_blocks = src, on_done, own_blocks
            r.deadline = time.monotonic() + self.config.request_timeout
            r.t0 = time.monotonic()
            self.stats["sends"] += 1
            self.metrics.request_started()
            self._maybe_start(r)

    # ------------------------------------------------------------ handshake
    def _on_frames(self, ident: bytes, data: bytes) -> None:
        peer = self._zmq_peers.get(ident)
        if peer is not None:
            peer.channel.deliver(data)
            return
        try:
            msg = P.decode(data)
        except ProtocolError as e:
            self._warn_bad(f"bad handshake frame: {e}")
            self._refuse(ident, f"bad handshake frame: {e}")
            return
        if not isinstance(msg, P.Register) or msg.role != P.Role.LANGUAGE:
            log.debug("ignoring %s from an unregistered peer", type(msg).__name__)
            return
        if self._keys is None:
            # without a key a tcp peer is anyone who reaches the port; peers on
            # this host use the Unix socket, where the kernel vouches for them
            self._warn_bad("tcp handshake refused: this encoder has no auth_key")
            self._refuse(ident, "tcp handshakes need an auth_key (Config(auth_key=...) / EMBRESUME_AUTH_KEY on "
                                "both sides); peers on the encoder's host connect over its Unix socket")
            return
        self._handshake_step(_HsZmq(self, ident), msg, [])

    def _refuse(self, ident: bytes, reason: str) -> None:
        """A Bye to an unregistered tcp peer, within the refusal rate (REFUSAL_RATE)."""
        if self._refusals.take():
            self.stats["refusals_sent"] += 1
            try:
                self._hub.send(ident, P.encode(P.Bye(clip(reason, 1000))))
            except PeerError:
                pass
        else:
            self.stats["refusals_dropped"] += 1

    def _on_unix_packet(self, conn: unix.Conn, data: bytes, fds: list) -> None:
        try:
            if conn.established:
                # after 'ready' the socket only marks liveness: a packet is a broken peer
                peer = conn.owner
                conn.close()
                if peer is not None:
                    self._peer_lost(peer, "unexpected packet on its handshake socket")
                return
            try:
                msg = P.decode(data)
            except ProtocolError as e:
                self._warn_bad(f"bad handshake packet from {conn!r}: {e}")
                self._bye(_HsUnix(conn), f"bad handshake packet: {e}")
                conn.close()
                return
            if not isinstance(msg, P.Register) or msg.role != P.Role.LANGUAGE:
                self._warn_bad(f"unexpected {type(msg).__name__} from {conn!r} during the handshake")
                conn.close()
                return
            if not self._handshake_step(_HsUnix(conn), msg, fds):
                conn.close()
        finally:
            unix.close_all(fds)             # what we keep, we duplicated (mmap, the rings' doorbells)

    def _on_unix_closed(self, conn: unix.Conn) -> None:
        self._handshakes.pop(conn, None)
        peer = conn.owner
        if isinstance(peer, _Peer):
            self._peer_lost(peer, "its handshake socket closed (the process exited or closed the endpoint)",
                            clean=True)

    def _on_unix_bad(self, conn: unix.Conn, err: Exception) -> None:
        self._warn_bad(f"bad handshake packet from {conn!r}: {err}")

    def _on_unix_refused(self, cred: tuple) -> None:
        self.stats["refused_uid"] += 1
        plog(logging.WARNING, "refused", "refused a same-host connection from pid %d uid %d: not an allowed "
             "uid %s (%d so far)", cred[0], cred[1], sorted(self.config.peer_uids), self.stats["refused_uid"])

    def _bye(self, hs, reason: str) -> None:
        if isinstance(hs, _HsZmq):
            self._refuse(hs.key, reason)
            return
        try:
            hs.reply(P.Bye(clip(reason, 1000)))
        except Exception:
            pass

    def _handshake_step(self, hs, msg: P.Register, fds: list) -> bool:
        """One handshake message; False when the handshake failed (the peer was told)."""
        try:
            self._handshake(hs, msg, fds)
            return True
        except Exception as e:
            self._warn_bad(f"handshake with {msg.session_id!r} failed: {e}")
            self._handshakes.pop(hs.key, None)
            self._bye(hs, f"{type(e).__name__}: {e}")
            return False

    def _on_send_error(self, ident: bytes, err: Exception) -> None:
        peer = self._zmq_peers.get(ident)
        if peer is not None:
            self._peer_lost(peer, f"control frame undeliverable: {err}")

    def _handshake(self, hs, msg: P.Register, fds: list) -> None:
        c = self.config
        phase = msg.desc.get("phase")
        if phase == "hello":
            if hs.key in self._handshakes:
                raise ProtocolError("desc.phase", "a second hello on one connection")
            layout = BlockLayout.from_dict(msg.desc.get("layout", {}))
            if layout.block_size != c.block_size or layout.hidden != c.hidden_size or layout.dtype != c.dtype:
                raise ConfigError(f"pool layout mismatch: language block_size={layout.block_size} "
                                  f"hidden={layout.hidden} dtype={layout.dtype}, encoder block_size={c.block_size} "
                                  f"hidden={c.hidden_size} dtype={c.dtype}")
            offered = msg.desc.get("offer")
            if not isinstance(offered, list) or not all(isinstance(x, str) for x in offered[:16]):
                raise ProtocolError("desc.offer", "expected a list of transport names")
            group = msg.desc.get("group", "")
            if not isinstance(group, str) or len(group) > MAX_GROUP:
                raise ProtocolError("desc.group", f"expected a TP group identity of at most {MAX_GROUP} characters")
            if len(self._peers) >= MAX_SESSIONS:
                self.stats["refused_sessions"] += 1
                raise PeerError(f"this encoder already serves {len(self._peers)} sessions "
                                f"(at most {MAX_SESSIONS})")
            chosen = select.choose(c, offered[:16], hs.same_host)
            while len(self._handshakes) >= MAX_PENDING_HANDSHAKES:   # the oldest half-open hello goes
                self._handshakes.pop(next(iter(self._handshakes)))
            self._handshakes[hs.key] = {"transport": chosen, "t": time.monotonic(), "group": group}
            hs.reply(_reply(chosen, {"phase": "hello"}))
            return
        if phase != "pool":
            raise ProtocolError("desc.phase", f"unknown handshake phase {phase!r}")
        state = self._handshakes.pop(hs.key, None)
        if state is None or state["transport"] != msg.transport:
            raise ProtocolError("transport", "pool description without a matching hello")
        name = state["transport"]
        try:
            desc = unix.unpack_fds(msg.desc, fds)
        except ValueError as e:
            raise ProtocolError("desc", str(e)) from None
        pdesc = desc.get("pool") or {}
        if not isinstance(pdesc, dict):
            raise ProtocolError("desc.pool", "expected an object")
        transport = self._transports.for_desc(name, pdesc)
        try:
            pool = transport.open_peer(pdesc)
        except TransportUnavailable as e:
            # this pair of processes cannot use it: the language side offers the next one
            log.info("transport %s unavailable for %s: %s", name, msg.session_id, e)
            hs.reply(_reply(name, {"phase": "retry", "reason": str(e)[:1000]}))
            return
        try:
            if hs.same_host:
                from .ipc.channel import RingChannel
                from .ipc.ring import ShmRing
                rings = desc.get("rings")
                if not isinstance(rings, dict) or not all(
                        isinstance(rings.get(k), list) and all(isinstance(x, unix.Fd) for x in rings[k])
                        for k in ("l2e", "e2l")):
                    raise ProtocolError("desc.rings", "expected the two control rings as passed fds")
                tx = ShmRing.from_handles(rings.get("e2l"))
                try:
                    rx = ShmRing.from_handles(rings.get("l2e"))
                except BaseException:
                    tx.close()
                    raise
                # no spinning for a rank in this very process: its answers need our GIL
                channel: Channel = RingChannel(tx=tx, rx=rx, name=f"enc-{msg.session_id}",
                                               spin_us=0 if hs.pid == os.getpid() else self.config.ring_spin_us)
            else:
                channel = ZmqChannel(self._hub, hs.key)
        except BaseException:
            transport.close_peer(pool)
            raise
        # a same-host peer's pid is the kernel's (SO_PEERCRED), not what it claims
        pid = hs.pid if hs.same_host else msg.pid
        peer = _Peer(msg.session_id, msg.tp_rank, pid, transport, pool, channel, hs.same_host and pid > 0, hs.conn,
                     group=state.get("group", ""), heartbeat_interval=c.heartbeat_interval)
        with self._lock:
            if self._closed or msg.session_id in self._peers or len(self._peers) >= MAX_SESSIONS:
                channel.close()
                transport.close_peer(pool)
                # a session id is bound to the connection that registered it
                raise PeerError("encoder endpoint is closing" if self._closed
                                else f"session {msg.session_id!r} is already connected"
                                if msg.session_id in self._peers else
                                f"this encoder already serves {MAX_SESSIONS} sessions")
            # 'ready' goes out before the peer is visible to the monitor, so
            # the first frame the language side sees on this socket is 'ready',
            # never a heartbeat
            hs.reply(_reply(name, {"phase": "ready"}))
            self._peers[msg.session_id] = peer
            if hs.conn is not None:
                hs.conn.owner = peer
                hs.conn.established = True
            else:
                self._zmq_peers[hs.key] = peer
        peer.worker.start()
        channel.start(lambda ch, m: self._on_message(peer, m),
                      lambda ch, e: self._on_bad_message(peer, e),
                      lambda ch: self._peer_lost(peer, "control channel closed"))
        log.info("language rank %d (%s) connected via %s", msg.tp_rank, msg.session_id, name)

    # ------------------------------------------------------------ messages
    def _on_bad_message(self, peer: _Peer, err: Exception) -> None:
        self.stats["bad_messages"] += 1
        peer.bad += 1
        plog(logging.WARNING, "bad_message", "bad message from %s: %s (%d from this peer so far)", peer.session_id,
             err, peer.bad)

    def _warn_bad(self, text: str) -> None:
        """Rate-limited warning about a frame from a not yet registered peer."""
        self.stats["bad_handshakes"] += 1
        plog(logging.WARNING, "bad_handshake", "%s (%d bad handshake frames so far)", text,
             self.stats["bad_handshakes"])

    def _on_message(self, peer: _Peer, msg: P.Message) -> None:
        if not peer.alive:
            return
        peer.last_seen = time.monotonic()
        if isinstance(msg, P.Heartbeat):
            if not peer.noop.take():
                self._noop_flood(peer)
            return
        inline = peer.channel.dedicated
        peer.busy = True            # the monitor does not count silence while we work
        if inline:
            # a channel with its own reader thread (the same-host ring) does the
            # write right after this message, saving a thread hand-off (the
            # ZeroMQ reader is shared by all remote peers and never writes)
            self._tls.peer, self._tls.jobs = peer, []
        try:
            with self._lock:
                self._handle(peer, msg)
        finally:
            try:
                if inline:
                    jobs, self._tls.jobs = self._tls.jobs, None
                    for job in jobs:
                        job()
            finally:
                peer.busy = False
                peer.last_seen = time.monotonic()

    def _handle(self, peer: _Peer, msg: P.Message) -> None:
        if not peer.alive:
            return
        if isinstance(msg, P.Init):
            self._on_init(peer, msg)
        elif isinstance(msg, P.Resume):
            self._on_resume(peer, msg)
        elif isinstance(msg, P.Abort):
            self._on_abort(peer, msg)
        elif isinstance(msg, P.Bye):
            self._peer_lost(peer, f"language rank said bye: {msg.reason}", clean=True)
        else:
            self.stats["unexpected_messages"] += 1
            plog(logging.WARNING, "unexpected", "ignoring unexpected %s from %s", type(msg).__name__, peer.session_id)
            if not peer.noop.take():
                self._noop_flood(peer)

    def _noop_flood(self, peer: _Peer) -> None:
        self.stats["noop_flood"] += 1
        self._peer_lost(peer, f"more than {peer.noop.rate:.0f} no-op frames a second (heartbeats or messages an "
                              "encoder never expects): disconnected")

    def _validate_dst(self, peer: _Peer, msg) -> None:
        if msg.session_id != peer.session_id:
            raise ProtocolError("session_id", f"{msg.session_id!r} on the channel of {peer.session_id!r}")
        nb = peer.pool.layout.num_blocks
        if max(msg.dst_blocks) >= nb:
            bad = next(b for b in msg.dst_blocks if b >= nb)
            raise ProtocolError("dst_blocks", f"block {bad} out of range [0, {nb})")
        check_block_size(msg.allocated_tokens, msg.dst_blocks, peer.pool.layout.block_size)

    def _reject(self, peer: _Peer, room: int, reason: str) -> None:
        """Fail one room for one rank that sent something invalid."""
        self.stats["rejected"] += 1
        plog(logging.WARNING, "rejected", "room %r from %s rejected: %s", room, peer.session_id, reason)
        r = self._rooms.get(room)
        if r is not None and peer.session_id in r.ranks:
            self._fail_room(r, reason)
        else:
            self._post(peer, P.StatusMsg(room, Status.Failed, reason=reason[:1000]))

    def _on_init(self, peer: _Peer, msg: P.Init) -> None:
        r = self._rooms.get(msg.room)
        if r is None and (peer.session_id, msg.room, msg.nonce) in self._finished_inits:
            self.stats["duplicates"] += 1  # rule 4: a replay of an INIT whose room finished
            return
        if r is not None:
            k = r.ranks.get(peer.session_id)
            if k is not None:
                if k.nonce == msg.nonce:
                    self.stats["duplicates"] += 1  # rule 4
                    return
                self._reject(peer, msg.room, "a new request for a room this rank is still receiving")
                return
            if r.ranks and r.group != peer.group:
                # the room belongs to the TP group of its first rank: another
                # group is told, whatever it claims, and the room is left alone
                self.stats["other_group"] += 1
                self._reject(peer, msg.room, "the room belongs to another TP group (another engine instance's "
                                             "ranks asked for it first)")
                return
            if r.tracker.status in (Status.Transferring, Status.Success):
                self._reject(peer, msg.room, f"room already {r.tracker.status.name} to its "
                                             f"{r.required} rank(s)")
                return
        try:
            self._validate_dst(peer, msg)
        except (ProtocolError, BlockSizeMismatch) as e:
            self._reject(peer, msg.room, str(e))
            return
        bound = min(peer.pool.layout.num_blocks, MAX_LIVE_BLOCKS_PER_SESSION)
        if peer.live_rooms >= MAX_LIVE_ROOMS_PER_SESSION or peer.live_blocks + len(msg.dst_blocks) > bound:
            self.stats["refused_bound"] += 1
            self._reject(peer, msg.room, f"this rank already has {peer.live_rooms} rooms and {peer.live_blocks} "
                                         f"blocks in flight (bounds: {MAX_LIVE_ROOMS_PER_SESSION} rooms, {bound} "
                                         "blocks)")
            return
        if r is None:
            r = _Room(msg.room, time.monotonic() + self.config.request_timeout)
            self._rooms[msg.room] = r
            self._finished.pop(msg.room, None)
        if r.required and len(r.ranks) >= r.required:
            # the room's ranks are complete: another session is told, the room is left alone
            self._reject(peer, msg.room, f"more than required_dst_info_num={r.required} ranks")
            return
        if r.required and r.required != msg.required_dst_info_num:
            # still gathering its ranks: they disagree, so every one of them is told now
            reason = (f"ranks disagree on required_dst_info_num ({r.required} vs "
                      f"{msg.required_dst_info_num})")
            self._reject(peer, msg.room, reason)
            self._fail_room(r, reason)
            return
        r.required = msg.required_dst_info_num
        r.group = peer.group
        k = r.ranks[peer.session_id] = _Rank(peer, msg.nonce, msg.dst_blocks, msg.allocated_tokens, pending=True)
        peer.live_rooms += 1
        self._count(k)
        r.deadline = time.monotonic() + self.config.request_timeout
        if len(r.ranks) == r.required and r.tracker.status is Status.Bootstrapping:
            r.tracker.set(Status.WaitingForInput)
        self._maybe_start(r)

    def _on_resume(self, peer: _Peer, msg: P.Resume) -> None:
        r = self._rooms.get(msg.room)
        rank = r.ranks.get(peer.session_id) if r is not None else None
        if rank is None or r.source is None or rank.nonce != msg.nonce:
            self._reject(peer, msg.room, "resume for a room this encoder does not hold")
            return
        try:
            self._validate_dst(peer, msg)
        except (ProtocolError, BlockSizeMismatch) as e:
            self._fail_room(r, str(e), cause="bad_message")
            return
        if rank.done or rank.pending or rank.in_flight:
            self.stats["duplicates"] += 1
            return
        if msg.sent_tokens != rank.sent_tokens:
            self._fail_room(r, f"resume with sent_tokens={msg.sent_tokens}, encoder sent {rank.sent_tokens}", cause="bad_message")
            return
        rank.dst_blocks, rank.allocated_tokens, rank.pending = msg.dst_blocks, msg.allocated_tokens, True
        self._count(rank)
        r.deadline = time.monotonic() + self.config.request_timeout
        self._maybe_start(r)

    def _on_abort(self, peer: _Peer, msg: P.Abort) -> None:
        r = self._rooms.get(msg.room)
        if r is not None and peer.session_id in r.ranks:
            self._fail_room(r, f"aborted by rank {peer.tp_rank}: {msg.reason}", ack_peer=peer, cause="aborted")
        else:
            # nothing of ours in flight: confirm at once so the rank frees its blocks
            self._post(peer, P.StatusMsg(msg.room, Status.Failed, reason="abort confirmed",
                                         flags=P.FLAG_ABORT_ACK))

    # ------------------------------------------------------------ transfers
    def _maybe_start(self, r: _Room) -> None:
        if r.source is None or not r.required or len(r.ranks) < r.required:
            return
        if r.tracker.status.terminal:
            return
        active = [k for k in r.ranks.values() if not k.done]
        if not active or not all(k.pending for k in active):
            return  # rule 5: a round starts when every rank asked for it
        src = r.source
        for k in active:
            layout = k.peer.pool.layout
            if src.hidden != layout.hidden or src.dtype != layout.dtype:
                self._fail_room(r, f"embedding is {src.hidden} x {src.dtype}, rank pool is "
                                   f"{layout.hidden} x {layout.dtype}")
                return
            try:
                plan = plan_chunk(src.total_tokens, k.sent_tokens, k.allocated_tokens, layout.block_size,
                                  k.dst_blocks)
            except (ProtocolError, BlockSizeMismatch) as e:
                self._fail_room(r, str(e), cause="bad_message")
                return
            k.pending, k.in_flight = False, True
            aux = aux_record(src.total_tokens, src.mrope_delta, layout.aux_ints) if k.chunks == 0 else None
            job = (lambda k=k, plan=plan, aux=aux: self._write(r, k, src, plan, aux))
            if self._here(k, plan):
                self._tls.jobs.append(job)      # run by this thread once the lock is released
            else:
                k.peer.jobs.put(job)

    def _here(self, k: _Rank, plan: ChunkPlan) -> bool:
        """Whether the calling thread writes the chunk itself: ``k``'s own ring
        reader always (it has nothing else to do), an application thread in
        ``send``/``send_tensors`` when the chunk is small and goes to a
        same-host peer (a memory copy: it returns a little later instead of
        paying a thread hand-off; a network write to a stalled peer could hold
        the caller, so those stay on the worker); anything else goes to the
        peer's worker."""
        t = self._tls
        if getattr(t, "jobs", None) is None:
            return False
        if t.peer is k.peer:
            return True
        return (t.peer is None and k.peer.channel.dedicated
                and plan.tokens * k.peer.pool.layout.emb_row_bytes <= INLINE_WRITE_BYTES)

    def _write(self, r: _Room, k: _Rank, src, plan: ChunkPlan, aux) -> None:
        """Runs on the rank's worker thread (or, same-host, its reader thread).

        While ``k.in_flight`` is set, a failure of the room does not post the
        rank's Failed status: this method posts it once the write is over, so
        the receiver never frees blocks that are still being written."""
        if r.tracker.status.terminal:
            self._end_in_flight(r, k)
            return
        try:
            pieces = self._pieces(k.peer, plan)
            for i, piece in enumerate(pieces):
                if r.tracker.status.terminal:
                    break  # failed meanwhile: Failed is posted below, after the write
                k.peer.transport.write_chunk(k.peer.pool, src, piece, aux if i == 0 else None)
                if i + 1 < len(pieces):
                    landed = piece.sent_tokens_after - (plan.sent_tokens_after - plan.tokens)
                    k.peer.channel.send(P.Progress(r.room, k.chunks + 1, landed))
        except Exception as e:
            with self._lock:
                # the failed write may still land: this rank must keep its blocks
                # away from other requests until the connection is torn down
                k.unsafe = True
                self._fail_room(r, f"transfer to rank {k.peer.tp_rank} failed: {e}", cause="transfer")
            self._end_in_flight(r, k)
            return
        with self._lock:
            if r.tracker.status.terminal:
                msg = None              # failed while we wrote: post Failed below
            else:
                msg = self._chunk_written(r, k, src, plan)
        if msg is None:
            self._end_in_flight(r, k)
            return
        try:
            k.peer.channel.send(msg)  # posted only after the data landed
        except PeerError as e:
            self._peer_lost(k.peer, str(e))

    @staticmethod
    def _count(k: _Rank) -> None:
        """``k``'s destination blocks are asked for (INIT/RESUME): count them
        against its session's bound until they are answered."""
        if not k.counted:
            k.counted = len(k.dst_blocks)
            k.peer.live_blocks += k.counted

    @staticmethod
    def _uncount(k: _Rank) -> None:
        """``k``'s blocks are answered (its chunk's STATUS, or Failed, is about
        to go out): the rank may reuse them."""
        if k.counted:
            k.peer.live_blocks -= k.counted
            k.counted = 0

    def _chunk_written(self, r: _Room, k: _Rank, src, plan: ChunkPlan) -> P.StatusMsg:
        """Book-keeping once a chunk landed (under the lock); returns its STATUS."""
        k.in_flight = False
        self._uncount(k)
        k.sent_tokens = plan.sent_tokens_after
        k.chunks += 1
        k.done = not plan.partial
        r.deadline = time.monotonic() + self.config.request_timeout
        self.stats["chunks"] += 1
        self.stats["bytes"] += plan.tokens * k.peer.pool.layout.emb_row_bytes
        self.metrics.chunk(plan.tokens * (k.peer.pool.layout.emb_row_bytes + 16))
        status = Status.Transferring if plan.partial else Status.Success
        msg = P.StatusMsg(r.room, status, k.chunks, k.sent_tokens, plan.tokens, src.total_tokens)
        if plan.partial:
            if r.tracker.status is not Status.Transferring:
                r.tracker.set(Status.Transferring)
        elif all(x.done for x in r.ranks.values()):
            r.tracker.set(Status.Success)
            self.metrics.request_succeeded(resumes=max(x.chunks for x in r.ranks.values()) - 1,
                                           latency_s=time.monotonic() - r.t0)
            self._finish(r)
        else:
            # this rank is done: ranks that already asked for their next
            # chunk were waiting for it (rule 5 gate)
            self._maybe_start(r)
        return msg

    def _end_in_flight(self, r: _Room, k: _Rank) -> None:
        """The write is over; if the room failed meanwhile, post its Failed now."""
        with self._lock:
            k.in_flight = False
            self._uncount(k)
            msg = k.failed_msg
            k.failed_msg = None
        if msg is not None:
            if k.unsafe:
                msg = dataclasses.replace(msg, flags=msg.flags | P.FLAG_BLOCKS_UNSAFE)
            try:
                k.peer.channel.send(msg)
            except PeerError:
                pass

    def _pieces(self, peer: _Peer, plan: ChunkPlan) -> list[ChunkPlan]:
        """Split a chunk into pieces for pipelined delivery: at most
        ``pipeline_bytes`` each, and a chunk of a few of them into about
        PIPELINE_PIECES pieces of at least MIN_PIECE_BYTES (a 1024-token chunk
        at hidden 4096 is 8 MiB: four pieces overlap its two copies, one would
        not overlap them at all)."""
        bb = peer.pool.layout.emb_block_bytes
        n = plan.src_block_end - plan.src_block_start
        per = min(self.config.pipeline_bytes // bb, max(-(-n // PIPELINE_PIECES), -(-MIN_PIECE_BYTES // bb)))
        if not peer.transport.pipelined or per <= 0 or n <= per:
            return [plan]
        bs = peer.pool.layout.block_size
        start_tokens = plan.sent_tokens_after - plan.tokens
        out = []
        for i0 in range(0, n, per):
            i1 = min(n, i0 + per)
            tokens = min(plan.tokens, i1 * bs) - i0 * bs
            out.append(ChunkPlan(plan.src_block_start + i0, plan.src_block_start + i1, plan.dst_blocks[i0:i1],
                                 tokens, start_tokens + i0 * bs + tokens, plan.partial or i1 < n))
        return out

    def _post(self, peer: _Peer, msg: P.StatusMsg) -> None:
        """Queue a status behind the peer's in-flight writes."""
        def job() -> None:
            try:
                peer.channel.send(msg)
            except PeerError:
                pass
        peer.jobs.put(job)

    def _fail_room(self, r: _Room, reason: str, ack_peer: Optional[_Peer] = None, cause: str = "error") -> None:
        if not r.tracker.fail():
            return
        r.reason = reason
        self.stats["failed"] += 1
        self.metrics.request_failed(cause)
        plog(logging.WARNING, "room_failed", "room %r failed: %s", r.room, reason)
        for k in r.ranks.values():
            if k.peer.alive:
                flags = (P.FLAG_BLOCKS_UNSAFE if k.unsafe else 0) | (P.FLAG_ABORT_ACK if k.peer is ack_peer else 0)
                msg = P.StatusMsg(r.room, Status.Failed, k.chunks, k.sent_tokens, reason=reason[:1000],
                                  flags=flags)
                if k.in_flight:
                    k.failed_msg = msg      # posted by _write once the write is over
                else:
                    self._post(k.peer, msg)
        self._finish(r)

    def _finish(self, r: _Room) -> None:
        self._rooms.pop(r.room, None)
        self._finished[r.room] = r.tracker.status
        while len(self._finished) > FINISHED_MEMORY:
            self._finished.popitem(last=False)
        for k in r.ranks.values():
            self._finished_inits[(k.peer.session_id, r.room, k.nonce)] = None
            k.peer.live_rooms -= 1
            if not k.in_flight:         # an in-flight write's blocks are answered once it is over
                self._uncount(k)
        while len(self._finished_inits) > FINISHED_MEMORY:
            self._finished_inits.popitem(last=False)
        self._cond.notify_all()
        if r.own_blocks and self.allocator is not None:
            self.allocator.free(r.own_blocks, r.room)
        r.source = None
        if r.on_done is not None:
            try:
                r.on_done(r.room, r.tracker.status)
            except Exception:
                log.exception("on_done callback failed")

    # ------------------------------------------------------------ liveness
    def _peer_lost(self, peer: _Peer, reason: str, clean: bool = False) -> None:
        with self._lock:
            if not peer.alive:
                return
            plog(logging.INFO if clean else logging.ERROR, "peer_gone", "language rank %d (%s) gone: %s",
                 peer.tp_rank, peer.session_id, reason)
            self._drop_peer(peer, reason)

    def _drop_peer(self, peer: _Peer, reason: str) -> None:
        peer.alive = False
        if self._peers.get(peer.session_id) is peer:
            del self._peers[peer.session_id]
        for ident, p in list(self._zmq_peers.items()):
            if p is peer:
                del self._zmq_peers[ident]
        for r in list(self._rooms.values()):
            if peer.session_id in r.ranks:
                self._fail_room(r, f"language rank {peer.tp_rank} lost: {reason}", cause="peer_lost")
        peer.jobs.put(lambda: self._close_peer(peer))
        peer.jobs.put(None)

    def _close_peer(self, peer: _Peer) -> None:
        """On the peer's worker, after its in-flight writes."""
        try:
            peer.channel.close()
        except Exception:
            pass
        if peer.conn is not None:
            peer.conn.close()
        try:
            peer.transport.close_peer(peer.pool)
        except Exception:
            log.debug("close_peer failed", exc_info=True)

    def _monitor_loop(self) -> None:
        seq = 0
        while not self._stop.wait(self.config.heartbeat_interval):
            seq += 1
            try:
                self._monitor_once(seq)
            except Exception:  # the monitor must outlive any one bad iteration
                log.exception("encoder monitor iteration failed")

    def _monitor_once(self, seq: int) -> None:
        c = self.config
        now = time.monotonic()
        with self._lock:
            peers = list(self._peers.values())
        for p in peers:
            # never blocks: a frame that does not fit the peer's ring waits in
            # that link's own queue (ipc/channel.py), not on this thread
            try:
                p.channel.send(P.Heartbeat(seq, time.time_ns()))
            except PeerError as e:
                self._peer_lost(p, str(e))
                continue
            stalled = p.channel.stalled_for()
            if stalled > c.peer_timeout:
                self.stats["stalled_links"] += 1
                self._peer_lost(p, f"stuck: its control ring made no room for {stalled:.1f}s (it does not read; "
                                   f"peer_timeout {c.peer_timeout}s)")
            elif now - p.last_seen > c.peer_timeout and not p.busy:
                self._peer_lost(p, f"no message for {now - p.last_seen:.1f}s")
            elif p.pid_check and not _pid_alive(p.pid):
                self._peer_lost(p, f"process {p.pid} exited")
        for ident, hs in list(self._handshakes.items()):     # hellos never followed by a pool
            if now - hs["t"] > c.handshake_timeout:
                self._handshakes.pop(ident, None)
        with self._lock:
            for r in list(self._rooms.values()):
                if now > r.deadline:
                    self._fail_room(r, f"timed out in {r.tracker.status.name} after {c.request_timeout}s", cause="timeout")

    # ------------------------------------------------------------ teardown
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for r in list(self._rooms.values()):
                self._fail_room(r, "encoder endpoint closed", cause="closed")
            peers = list(self._peers.values())
        self._stop.set()
        self._monitor.join(timeout=2)
        for p in peers:
            try:
                p.channel.send(P.Bye("encoder endpoint closed"))
            except PeerError:
                pass
            with self._lock:
                self._drop_peer(p, "encoder endpoint closed")
        for p in peers:
            p.worker.join(timeout=5)
        self._unix.close()
        self._hub.close()
        self._transports.close()
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> "EncoderEndpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
