"""The encoder endpoint: finished embeddings in, chunks out.

``send`` registers a finished embedding for a room; INIT/RESUME messages from
the language ranks say where to write.  For each chunk the planner decides
what fits, the transport writes it, and only then the chunk's STATUS
(Transferring or Success) is posted — per rank, in order, on the rank's own
worker thread, so one slow rank never delays another's control messages.

Two layers (docs/design.md, "Room state machines"):

* :class:`embresume.rooms.encoder.EncoderRooms`, the room state machine,
  does no I/O: it holds the rooms, their sources and ranks, the rounds, the
  per-session bounds, the finished rooms and INITs (rule 4) and the
  timeouts, and answers each event (``register`` / ``withdraw``, a rank's
  INIT / RESUME / ABORT, a write that landed, failed or was skipped, a lost
  peer, ``tick(now)``, ``close``) with actions: ``Write`` (start a transport
  write), ``SendAfterWrite`` (a STATUS the writing thread sends after its
  chunk landed), ``Send`` (a STATUS queued behind the rank's writes), ``Reject``
  (a refusal to one rank) and ``Done`` (a room ended: wake its waiters, free
  its blocks, call ``on_done``).  It counts into its
  :class:`~embresume.rooms.Tally`, which this shell records into
  :attr:`EncoderEndpoint.stats` (a :class:`~embresume.metrics.EndpointStats`:
  the counters and the process-wide metrics in one call) after each event.
  What a writing thread needs without the lock is in its ``Write`` as data
  (the chunk's ``seq``, the room's ``ended``).
* :class:`EncoderEndpoint`, this module, is the I/O shell: handshakes (Unix
  socket and ZeroMQ), peers and their control channels, worker threads,
  transports, heartbeats and the liveness monitor, the endpoint lock.  It
  feeds the machine under the lock and carries out its actions there, except
  the writes (on the rank's worker or reader thread, or the thread of
  ``send`` for a small first chunk) and the ``SendAfterWrite`` of their STATUS, which
  happen once the lock is released: no blocking I/O under the lock.

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

import functools
import logging
import queue
import threading
import time
from typing import Callable, Optional, Sequence

import torch
import zmq

from . import auth
from .logutil import RateLimitedLog
from . import protocol as P
from .blocks import BlockAllocator, BlockLayout, BlockPool
from .channel import Channel, ZmqHub, noop_bucket
from .ipc import unix
from .config import as_config, Config
from .errors import ConfigError, EmbResumeTimeout, FailCode, PeerError
from .node import pid_alive as _pid_alive
from .handshake.encoder import (MAX_GROUP, MAX_PENDING_HANDSHAKES, REFUSAL_BURST, REFUSAL_RATE,  # noqa: F401
                                Handshakes, reply)
from .metrics import EndpointStats
from .inline_writes import INLINE_WRITE_BYTES, InlineWrites  # noqa: F401
from .peer_table import PeerTable
from .pieces import MIN_PIECE_BYTES, PIPELINE_PIECES, pieces  # noqa: F401
from .rooms.encoder import (FINISHED_MEMORY, MAX_LIVE_BLOCKS_PER_SESSION, MAX_LIVE_ROOMS_PER_SESSION,  # noqa: F401
                            NOT_PUBLISHED_MEMORY, Done, EncoderRooms, Reject, Room, Send, SendAfterWrite, Session,
                            Write)
from .send_args import check_delta, tensor_source
from .source import BlockSource, aux_record
from .status import Status
from .transport import select
from .transport.base import PeerPool, Transport

log = logging.getLogger("embresume.encoder")
#: what peers cause (bad frames, rejected rooms, refusals): a bounded number of lines
plog = RateLimitedLog(log)

#: INLINE_WRITE_BYTES (which thread writes a chunk: embresume.inline_writes) and
#: PIPELINE_PIECES, MIN_PIECE_BYTES (pipelined chunks: embresume.pieces), imported above
#: MAX_PENDING_HANDSHAKES, REFUSAL_RATE, REFUSAL_BURST, MAX_GROUP: the handshakes'
#: (embresume.handshake.encoder), imported above
#: FINISHED_MEMORY, MAX_LIVE_ROOMS_PER_SESSION, MAX_LIVE_BLOCKS_PER_SESSION,
#: NOT_PUBLISHED_MEMORY: the room machine's (embresume.rooms.encoder), imported above
#: language sessions (ranks' connections) one encoder serves at once; each has its
#: own worker and writer threads, rings and pool mapping: a hello past it is refused
MAX_SESSIONS = 1024
#: the largest control frame accepted from any peer (an INIT of 1M blocks, a handshake description)
MAX_FRAME = max(P.MAX_BLOB, 4 << 20) + 64 * 1024


class _Peer:
    """One connected language rank."""

    def __init__(self, session_id: str, tp_rank: int, pid: int, transport: Transport, pool: PeerPool,
                 channel: Channel, pid_check: bool, conn: Optional[unix.Conn] = None, group: str = "",
                 heartbeat_interval: float = 0.5):
        self.session_id = session_id
        #: the TP group (engine instance) this rank says it belongs to: a room's
        #: ranks are all of one group
        self.group = group
        #: the room machine's view of this session (its group, layout, live counts)
        self.sess = Session(session_id, group, pool.layout, self, tp_rank)
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

    def close(self) -> None:
        """On the peer's worker, after its in-flight writes: its channel, socket and pool mapping."""
        try:
            self.channel.close()
        except Exception:
            pass
        if self.conn is not None:
            self.conn.close()
        try:
            self.transport.close_peer(self.pool)
        except Exception:
            log.debug("close_peer failed", exc_info=True)


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
        #: the writes a thread does itself once the lock is released (embresume.inline_writes)
        self._inline = InlineWrites()
        #: counters of this endpoint; the events that have a process-wide series
        #: (prometheus_client's registry, see embresume.metrics) are recorded in both at once
        self.stats = EndpointStats(role="encoder")
        self.metrics = self.stats.metrics
        #: the rooms, their ranks and the per-session bounds (no I/O: this shell carries out its actions)
        self._m = EncoderRooms(stats=self.stats, request_timeout=c.request_timeout)
        if self.allocator is not None:
            self.stats.pool(0, pool_blocks)
        #: the connected ranks, by session id (``_peers``) and by ZeroMQ identity (``_zmq_peers``)
        self._table = PeerTable(MAX_SESSIONS)
        self._peers, self._zmq_peers = self._table.by_session, self._table.by_ident
        self._transports = select.TransportSet(self.config)
        self._closed = False
        self._stop = threading.Event()
        address = bind or c.encoder_endpoint
        keys = auth.keys_for(c)
        if keys is None and not auth.is_loopback(address):
            raise ConfigError(f"refusing to bind {address} without an auth_key: anyone who reaches it could "
                              "read the embeddings. Set Config(auth_key=...) or EMBRESUME_AUTH_KEY on both sides, "
                              "or bind a loopback address")
        self._keys = keys
        #: the handshakes (embresume.handshake.encoder): hello, pool, ready / retry, refusals
        self._hs = Handshakes(c, stats=self.stats, keys=keys, transports=self._transports,
                              check_sessions=self._check_sessions, admit=self._admit_peer, peer_lost=self._peer_lost)
        self._handshakes = self._hs.pending         # hellos waiting for their pool description
        self._hub = ZmqHub(zmq.ROUTER, bind=address, on_frames=self._on_frames, name="encoder",
                           on_send_error=self._on_send_error, curve_keys=keys, max_frame=MAX_FRAME)
        self._hs.hub = self._hub
        self.address = self._hub.address
        self.unix_name = unix.socket_name(self.address)
        try:
            self._unix = self._hs.listen_unix(self.unix_name)
        except ConfigError:
            self._hub.close()
            raise
        self._monitor = threading.Thread(target=self._monitor_loop, name="embresume-enc-monitor", daemon=True)
        self._monitor.start()

    @property
    def _rooms(self) -> "dict[P.Room, Room]":
        """The live rooms (the machine's table): room -> Room, its ``ranks`` by session id."""
        return self._m.rooms

    # ------------------------------------------------------------ public API
    def send_tensors(self, room: P.Room, embeddings: torch.Tensor, fill_ids: torch.Tensor,
                     mrope_positions: torch.Tensor, mrope_delta: int = 0,
                     on_done: Optional[Callable[[P.Room, Status], None]] = None) -> None:
        """Register the model's output for ``room`` (kept, not copied, until done).

        ``room`` is an int, str or bytes key (see :mod:`embresume.protocol`).
        Bad arguments raise :class:`~embresume.errors.InvalidArgument` here,
        before anything is registered."""
        P.check_room(room)
        check_delta(mrope_delta)
        self._register(room, tensor_source(self.config, embeddings, fill_ids, mrope_positions, mrope_delta), on_done,
                       None)

    def send(self, room: P.Room, src_blocks: Sequence[int], total_tokens: int, mrope_delta: int = 0,
             on_done: Optional[Callable[[P.Room, Status], None]] = None, free_blocks: bool = True) -> None:
        """Register an embedding held in blocks of this endpoint's pool.

        With ``free_blocks`` the blocks go back to :attr:`allocator` when the
        room ends (Success, Failed or timeout)."""
        if self.pool is None:
            raise ConfigError("this encoder has no local pool; create it with pool_blocks=N or use send_tensors")
        P.check_room(room)
        check_delta(mrope_delta)
        src = BlockSource(self.pool, list(src_blocks), total_tokens, int(mrope_delta))
        self._register(room, src, on_done, list(src_blocks) if free_blocks else None)

    def withdraw(self, room: P.Room) -> bool:
        """Take back an embedding registered with :meth:`send_tensors` or
        :meth:`send` that no language rank has asked for yet: the endpoint
        lets go of it now (its ``on_done`` sees ``Failed``) instead of at
        ``request_timeout``.  Returns False, changing nothing, for a room that
        is unknown, finished, or already asked for (that one runs to its end).

        A rank that asks for a withdrawn room (or one that timed out while
        registered) is answered at once with Failed, code
        :attr:`~embresume.errors.FailCode.NOT_PUBLISHED`, until the room is
        registered again (the last ``NOT_PUBLISHED_MEMORY`` such rooms are
        remembered)."""
        with self._lock:
            acts = self._m.withdraw(room)
            if acts is None:
                return False
            self._run(acts)
            return True

    def expect(self, room: P.Room) -> None:
        """Say that ``room`` is about to be registered (``send`` /
        ``send_tensors`` from another thread): if it was withdrawn or timed
        out earlier, a rank's INIT arriving before the registration waits for
        it instead of being answered NOT_PUBLISHED."""
        with self._lock:
            self._m.expect(room)

    def wait(self, room: P.Room, timeout: Optional[float] = None) -> Status:
        """Block until ``room`` is terminal (Success or Failed) or ``timeout``
        seconds passed; returns its status then (non-terminal on timeout).
        Raises KeyError for a room this endpoint never saw."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                st = self._m.status(room)       # the machine's answer: live, finished, or None
                if st is None:
                    raise KeyError(f"unknown room {room!r}")
                left = None if deadline is None else deadline - time.monotonic()
                if st.terminal or left is not None and left <= 0:
                    return st
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
        blocks = self.allocator.allocate(tokens, room)
        self.stats.pool(self.allocator.used_blocks)
        return blocks

    def poll(self, room: P.Room) -> Status:
        with self._lock:
            st = self._m.status(room)
        if st is None:
            raise KeyError(f"unknown room {room!r}")
        return st

    def peers(self) -> list[dict]:
        with self._lock:
            return [{"session_id": p.session_id, "tp_rank": p.tp_rank, "transport": p.transport.name,
                     "alive": p.alive} for p in self._peers.values()]

    def wait_peers(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._table.alive() >= n:
                    return
            time.sleep(0.005)
        raise PeerError(f"{n} language ranks did not connect within {timeout}s")

    def _register(self, room: P.Room, src, on_done, own_blocks) -> None:
        # a small first chunk whose INIT is already here is written by this
        # thread once the lock is released (no hand-off to the peer's worker)
        outer = self._inline.open()
        try:
            with self._lock:
                if self._closed:
                    raise PeerError("endpoint is closed")
                self._run(self._m.register(room, src, time.monotonic(), on_done, own_blocks))
        finally:
            if outer:
                self._inline.run(guard=True)

    # ------------------------------------------------------------ handshakes (embresume.handshake.encoder)
    def _on_frames(self, ident: bytes, data: bytes) -> None:
        peer = self._zmq_peers.get(ident)
        if peer is not None:
            peer.channel.deliver(data)
            return
        self._hs.on_frame(ident, data)

    def _on_send_error(self, ident: bytes, err: Exception) -> None:
        peer = self._zmq_peers.get(ident)
        if peer is not None:
            self._peer_lost(peer, f"control frame undeliverable: {err}")

    def _check_sessions(self) -> None:
        """(handshake, hello) Refuse a session past MAX_SESSIONS."""
        if len(self._peers) >= MAX_SESSIONS:
            self.stats["refused_sessions"] += 1
            raise PeerError(f"this encoder already serves {len(self._peers)} sessions "
                            f"(at most {MAX_SESSIONS})")

    def _admit_peer(self, hs, msg: P.Register, name: str, transport: Transport, pool: PeerPool, channel: Channel,
                    pid: int, group: str) -> None:
        """(handshake, pool description) The peer is set up: reply 'ready' and make it visible, or raise."""
        c = self.config
        peer = _Peer(msg.session_id, msg.tp_rank, pid, transport, pool, channel, hs.same_host and pid > 0, hs.conn,
                     group=group, heartbeat_interval=c.heartbeat_interval)
        with self._lock:
            refused = self._table.refusal(msg.session_id, self._closed)
            if refused:
                channel.close()
                transport.close_peer(pool)
                raise PeerError(refused)
            # 'ready' goes out before the peer is visible to the monitor, so
            # the first frame the language side sees on this socket is 'ready',
            # never a heartbeat
            hs.reply(reply(name, {"phase": "ready"}))
            self._table.add(peer, hs)
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

    def _on_message(self, peer: _Peer, msg: P.Message) -> None:
        if not peer.alive:
            return
        peer.last_seen = time.monotonic()
        if isinstance(msg, P.Heartbeat):
            if not peer.noop.take():
                self._noop_flood(peer)
            return
        # a channel with its own reader thread (the same-host ring) does the
        # write right after this message, saving a thread hand-off (the
        # ZeroMQ reader is shared by all remote peers and never writes)
        inline = peer.channel.dedicated and self._inline.open(peer)
        peer.busy = True            # the monitor does not count silence while we work
        try:
            with self._lock:
                self._handle(peer, msg)
        finally:
            try:
                if inline:
                    self._inline.run()
            finally:
                peer.busy = False
                peer.last_seen = time.monotonic()

    def _handle(self, peer: _Peer, msg: P.Message) -> None:
        if not peer.alive:
            return
        t = type(msg)
        if t is P.Init:
            self._run(self._m.init(peer.sess, msg, peer.last_seen))      # last_seen: now, by _on_message
        elif t is P.Resume:
            self._run(self._m.resume(peer.sess, msg, peer.last_seen))
        elif t is P.Abort:
            self._run(self._m.abort(peer.sess, msg))
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

    # ------------------------------------------------------------ the machine's actions
    def _run(self, acts: list, defer: bool = False) -> Optional[list]:
        """Carry out the machine's actions, in order, under the lock.  A
        :class:`SendAfterWrite` is returned (with ``defer``, to the writing
        thread that sends it once the lock is released) or else sent like a
        :class:`Send`.  Then the machine's tally is recorded into ``stats``."""
        sends = None
        for a in acts:
            t = type(a)
            if t is Write:
                self._start_write(a)
            elif t is SendAfterWrite:
                if defer:
                    if sends is None:
                        sends = [a]
                    else:
                        sends.append(a)
                else:
                    self._post(a.session.peer, a.msg)
            elif t is Send:
                self._post(a.session.peer, a.msg)
            elif t is Done:
                self._done(a.room)
            elif t is Reject:
                if a.code is FailCode.NOT_PUBLISHED:      # an item let go of: expected, not a peer's fault
                    log.debug("room %r from %s: %s", a.room, a.session.id, a.reason)
                else:
                    plog(logging.WARNING, "rejected", "room %r from %s rejected: %s", a.room, a.session.id, a.reason)
                if a.msg is not None:
                    self._post(a.session.peer, a.msg)
            else:   # pragma: no cover - a machine action this shell does not know
                raise AssertionError(f"unknown action {a!r}")
        tally = self._m.stats
        if tally:
            tally.record()          # the machine's counts, into self.stats, after its events
        return sends

    def _send_all(self, sends: list) -> None:
        """Send the machine's :class:`SendAfterWrite` actions, outside the lock, on this (the writing) thread."""
        for a in sends:
            peer = a.session.peer
            try:
                peer.channel.send(a.msg)
            except PeerError as e:
                self._peer_lost(peer, str(e))

    def _start_write(self, a: Write) -> None:
        peer = a.rank.session.peer
        job = functools.partial(self._write, a)
        if self._inline.here(peer, a.plan.tokens):
            self._inline.add(job)       # run by this thread once the lock is released
        else:
            peer.jobs.put(job)

    def _done(self, r: Room) -> None:
        """A room is terminal (and out of the table): wake waiters, free its blocks, tell the application."""
        self._cond.notify_all()
        if r.cause == "expired":
            log.debug("room %r: its embedding expired, nobody asked for it: %s", r.room, r.reason)
        elif r.cause:
            plog(logging.WARNING, "room_failed", "room %r failed: %s", r.room, r.reason)
        if r.own_blocks and self.allocator is not None:
            self.allocator.free(r.own_blocks, r.room)
            self.stats.pool(self.allocator.used_blocks)
        if r.on_done is not None:
            try:
                r.on_done(r.room, r.tracker.status)
            except Exception:
                log.exception("on_done callback failed")

    # ------------------------------------------------------------ transfers
    def _write(self, a: Write) -> None:
        """Runs on the rank's worker thread (or, same-host, its reader thread,
        or the thread of ``send`` for a small first chunk).

        While the rank is in flight, a failure of the room does not post the
        rank's Failed status: the machine hands it back (a SendAfterWrite) once the
        write is over, so the receiver never frees blocks still being written."""
        r, k, plan, src, ended = a.room, a.rank, a.plan, a.source, a.ended
        peer = k.session.peer
        if ended.set:
            with self._lock:
                sends = self._run(self._m.write_skipped(r, k), True)
            if sends:
                self._send_all(sends)
            return
        try:
            aux = aux_record(src.total_tokens, src.mrope_delta, peer.pool.layout.aux_ints) if a.first else None
            parts = pieces(plan, peer.pool.layout, self.config.pipeline_bytes, peer.transport.pipelined)
            for i, piece in enumerate(parts):
                if ended.set:
                    break  # failed meanwhile: its Failed is sent below, after the write
                peer.transport.write_chunk(peer.pool, src, piece, aux if i == 0 else None)
                if i + 1 < len(parts):
                    landed = piece.sent_tokens_after - (plan.sent_tokens_after - plan.tokens)
                    peer.channel.send(P.Progress(r.room, a.seq, landed))
        except Exception as e:
            with self._lock:
                # the failed write may still land: this rank must keep its blocks
                # away from other requests until the connection is torn down
                sends = self._run(self._m.write_failed(r, k, f"transfer to rank {peer.tp_rank} failed: {e}"), True)
            if sends:
                self._send_all(sends)
            return
        with self._lock:
            sends = self._run(self._m.written(r, k, plan, time.monotonic()), True)
        if sends:
            self._send_all(sends)     # the chunk's STATUS: posted only after the data landed

    def _post(self, peer: _Peer, msg: P.StatusMsg) -> None:
        """Queue a status behind the peer's in-flight writes."""
        def job() -> None:
            try:
                peer.channel.send(msg)
            except PeerError:
                pass
        peer.jobs.put(job)

    # ------------------------------------------------------------ liveness
    def _peer_lost(self, peer: _Peer, reason: str, clean: bool = False) -> None:
        with self._lock:
            if not peer.alive:
                return
            # while this endpoint closes, its own Bye makes the peer hang up: a goodbye, not an error
            clean = clean or self._closed
            plog(logging.INFO if clean else logging.ERROR, "peer_gone", "language rank %d (%s) gone: %s",
                 peer.tp_rank, peer.session_id, reason)
            self._drop_peer(peer, reason)

    def _drop_peer(self, peer: _Peer, reason: str) -> None:
        peer.alive = False
        self._table.remove(peer)
        self._run(self._m.peer_lost(peer.sess, reason))
        peer.jobs.put(peer.close)       # on its worker, after its in-flight writes
        peer.jobs.put(None)

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
        self._hs.expire(now)                # hellos never followed by a pool description
        with self._lock:
            self._run(self._m.tick(now))

    # ------------------------------------------------------------ teardown
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._run(self._m.close())
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
