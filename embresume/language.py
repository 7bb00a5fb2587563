"""The language endpoint: one receive pool, any number of encoders, resume and merge.

Lifecycle of one request (``room``) on a language rank::

    request(room, encoder=addr, expected_tokens=N)
                                       Bootstrapping   (while the encoder's connection is set
                                                        up off the caller's thread, or the pool
                                                        has no room)
      allocate ceil(N / block_size) blocks (hint) or default_allocate_tokens (>= 1 block)
      send INIT(allocated_tokens = len(blocks) * block_size) to that encoder
                                       WaitingForInput
    STATUS Transferring (chunk k)      Transferring
      chunk 1: read total + mrope delta from aux of the first block, allocate the merged tensors
      gather the chunk into place, free its blocks, allocate the rest, send RESUME(sent_tokens, allocated_tokens)
    STATUS Success (last chunk)        Success   -> result(room) / recv(room)
    STATUS Failed / timeout / peer death           Failed    -> blocks freed, reason and code kept
                                                                (failure_reason / failure_code; result()
                                                                raises TransferFailed.of(code): RoomBusy,
                                                                NotPublished, ...)

The endpoint is an I/O shell around :class:`~embresume.rooms.language.LanguageRooms`,
the room state machine that does no I/O: the shell owns the encoder
connections (handshakes, control channels, heartbeats, liveness), its threads
and its lock, the pool memory and the copies out of it; it feeds the machine
the events its links bring (STATUS, PROGRESS, a copy that finished, a lost
link, the clock) and carries out the actions it returns (send INIT, RESUME or
ABORT, copy these blocks, hand out this result, tear that link down).  Which
block belongs to whom at each moment is the machine's ledger
(docs/design.md, section 5).  What the shell keeps per request (merge
buffer, result, latch) is in its own table (:mod:`embresume.shell_rooms`),
never in the machine's records; its reads out of the pool (the aux record,
which it hands the machine as data, the copies, the results) are
:mod:`embresume.pool_reads`.

One endpoint owns ONE receive pool and ONE allocator, whatever the number of
encoders: the pool is exported once per transport instance (shm: one segment
each encoder maps; cuda_ipc: one handle; Mooncake: one registration) and every
encoder connection gets the same description.  Each connection has its own
control channel, heartbeats and liveness check; an encoder's death fails only
the rooms requested from it, and the next request naming it reconnects
(bounded backoff).

No call waits for an encoder (docs/design.md, section 8): control sends go
into the link's ring or its bounded queue; an encoder whose ring stays full,
that floods no-op frames, or that leaves an abort unanswered (or blocks held
after a failed write) for the quarantine timeout is torn down, and
``Config.extra["max_encoder_share"]`` caps what one encoder can hold of the pool.

The scheduler loop calls :meth:`LanguageEndpoint.poll` (non-blocking) and
:meth:`LanguageEndpoint.result`; :meth:`LanguageEndpoint.recv` is the blocking
convenience.  All network and copy work runs on threads the endpoint owns.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import time
import uuid
from typing import Optional
from urllib.parse import urlsplit

import torch

from . import auth, metrics
from .logutil import RateLimitedLog
from . import protocol as P
from .blocks import BlockLayout, BlockPool
from .channel import Channel, noop_bucket
from .ipc import unix
from .config import as_config, Config
from .errors import ConfigError, EmbResumeTimeout, FailCode, InvalidArgument, PeerError, TransferFailed, UnknownRoom
from .merge import EmbeddingResult, ResultArena
from .node import pid_alive as _pid_alive
from .handshake.language import Handshaker, Link
from .rooms.language import (MAX_REQUEST_TOKENS, Complete, Connect, Copy, Discard, LanguageRooms, Notify,
                             Send, TearDown, ZeroCopy, check_request_args)
from .pool_reads import PoolReads
from .shell_rooms import FinishedRooms, RoomIO, ShellRooms
from .status import Status
from .transport import select

__all__ = ["LanguageEndpoint", "MAX_REQUEST_TOKENS"]

#: the link's old name (tests build fake links with it)
_Link = Link

log = logging.getLogger("embresume.language")
#: what the encoder causes (bad messages): a bounded number of lines
plog = RateLimitedLog(log)

#: reconnect back-off after a failed connection attempt: doubles from BASE up to CAP
BACKOFF_BASE, BACKOFF_CAP = 0.05, 2.0
#: a quarantined room waits for the encoder's abort acknowledgement (and blocks
#: held after a failed write wait) at most this many peer_timeouts; then the
#: encoder counts as stuck: its connection is torn down (its rooms fail, all
#: that was parked for it is freed, the next request naming it reconnects).
#: Config.extra["quarantine_timeout"] (seconds) overrides.
QUARANTINE_TIMEOUT_FACTOR = 2.0


class _Encoder:
    """An encoder this endpoint talks to (by address), across reconnections:
    its connection (the I/O side).  What its rooms hold (pending rooms,
    quarantined and held blocks) is the machine's record ``rooms``."""

    def __init__(self, address: str, rooms):
        self.address = address
        self.rooms = rooms                  # the machine's record of it (rooms.language.Enc)
        self.state = "idle"                 # idle | connecting | up | down
        self.link: Optional[Link] = None
        self.transport = ""                 # of the last connection
        self.failures = 0                   # failed attempts in a row (back-off)
        self.connections = 0                # successful ones
        self.retry_at = 0.0
        self.reason = ""
        self.connected = threading.Event()
        self.thread: Optional[threading.Thread] = None

    @property
    def quarantine(self) -> dict:
        return self.rooms.quarantine

    @property
    def held(self) -> dict:
        return self.rooms.held


#: the longest TP group identity
MAX_GROUP = 256


def _tp_group(config: Config, given: Optional[str]) -> str:
    """This rank's TP group identity: the ranks of one engine instance share it,
    and an encoder keeps a room to the ranks of the group that asked first.
    ``tp_group=`` / ``Config.extra["tp_group"]`` / ``EMBRESUME_TP_GROUP``.  The
    default is no group (``""``): ranks that set none form one group together,
    as before groups existed (a default derived from this process could differ
    between the ranks of one engine, e.g. across hosts, and fail its rooms).
    A secret value makes the group unforgeable by other processes (docs/security.md)."""
    g = given if given is not None else config.extra.get("tp_group") or os.environ.get("EMBRESUME_TP_GROUP") or ""
    if not isinstance(g, str) or len(g) > MAX_GROUP:
        raise InvalidArgument(f"tp_group must be a str of at most {MAX_GROUP} characters, got {g!r:.80}")
    return g


def _share_limit(config: Config, num_blocks: int) -> int:
    share = config.extra.get("max_encoder_share")
    if share is None:
        return 0
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ConfigError(f"extra['max_encoder_share'] must be a fraction of the pool in (0, 1], got {share!r}")
    return 0 if share >= 1 else max(1, int(share * num_blocks))


def _quarantine_timeout(config: Config) -> float:
    t = config.extra.get("quarantine_timeout")
    if t is None:
        return QUARANTINE_TIMEOUT_FACTOR * config.peer_timeout
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
        raise ConfigError(f"extra['quarantine_timeout'] must be a number of seconds > 0, got {t!r}")
    return float(t)


def _check_address(address) -> str:
    if not isinstance(address, str):
        raise InvalidArgument(f"an encoder address is a str like 'tcp://host:port', got {type(address).__name__}")
    if address.startswith("tcp://"):
        try:
            u = urlsplit(address)
            ok = bool(u.hostname) and u.port is not None and 0 < u.port < 65536
        except ValueError:
            ok = False
        if not ok:
            raise InvalidArgument(f"bad encoder address {address!r}: expected tcp://host:port")
    elif not address.startswith(("ipc://", "inproc://")):
        raise InvalidArgument(f"bad encoder address {address!r}: expected tcp://host:port")
    return address


class LanguageEndpoint:
    """One language (tensor-parallel) rank: one receive pool fed by any number of encoders.

    ``LanguageEndpoint(config, tp_rank=0)`` creates the pool and, with
    ``connect=True``, connects to ``config.encoder_endpoint`` before
    returning (raising :class:`~embresume.errors.PeerError` when it cannot).
    With ``connect=False`` no encoder is contacted until a request names one.
    Thread-safe; use as a context manager or call :meth:`close`.
    """

    def __init__(self, config: Optional[Config] = None, *, tp_rank: int = 0, connect: bool = True,
                 tp_group: Optional[str] = None):
        self.config = as_config(config, "LanguageEndpoint")
        if isinstance(tp_rank, bool) or not isinstance(tp_rank, int) or not 0 <= tp_rank <= 0xFFFF:
            raise InvalidArgument(f"tp_rank must be an int in [0, 65535], got {tp_rank!r}")
        self.tp_rank = tp_rank
        self.tp_group = _tp_group(self.config, tp_group)
        self.session_id = f"lang-{uuid.uuid4().hex[:12]}-r{tp_rank}"
        c = self.config
        self.layout = BlockLayout(c.total_pool_blocks, c.block_size, c.hidden_size, c.dtype, c.aux_ints)
        #: the most blocks one encoder's requests, quarantine and held blocks may
        #: take (Config.extra["max_encoder_share"], a fraction of the pool); 0: no cap
        self._share_limit = _share_limit(c, self.layout.num_blocks)
        self.arena = ResultArena(c.result_cache_bytes, c.block_size)
        self._lock = threading.RLock()
        self._encoders: dict[str, _Encoder] = {}
        self._connections = itertools.count(1)
        self._closed = False
        self._stop = threading.Event()
        #: rooms that reached a terminal status, for take_finished (once track_finished was called)
        self._finished = FinishedRooms()
        #: this endpoint's counters; the same calls feed the process-wide metrics
        #: (prometheus_client's registry, see embresume.metrics): one source
        self.stats = metrics.EndpointStats("language")
        self.stats.pool(0, self.layout.num_blocks)
        self._transports = select.TransportSet(c)
        self._keys = auth.keys_for(c)
        backing, device = select.create_pool_backing(c, self.layout.nbytes)
        self.pool = BlockPool(self.layout, backing)
        #: the handshakes (embresume.handshake.language): connect, offer, export the pool once per transport
        self._handshaker = Handshaker(c, pool=self.pool, layout=self.layout, tp_rank=tp_rank, tp_group=self.tp_group,
                                      new_session=lambda: self._session(), keys=self._keys,
                                      transports=self._transports, stop=self._stop)
        self._exports = self._handshaker.exports      # id(transport instance) -> pool description
        #: the pool stayed on the host for a GPU model (no transport could export a GPU pool)
        self._move_results = self.pool.device.type != torch.device(c.device).type
        #: the reads out of the pool: aux records, copies into merge buffers, results
        self._reads = PoolReads(self.pool, self.arena, c.device if self._move_results else None)
        #: the room state machine (no I/O): requests, resumes, timeouts, the block ledger
        self._rooms = LanguageRooms(
            num_blocks=self.layout.num_blocks, block_size=self.layout.block_size,
            row_bytes=self.layout.emb_row_bytes, stats=self.stats,
            default_allocate_tokens=c.default_allocate_tokens, max_chunk_tokens=c.max_chunk_tokens,
            request_timeout=c.request_timeout, quarantine_timeout=_quarantine_timeout(c),
            zero_copy=bool(c.zero_copy) and not self._move_results, share_limit=self._share_limit,
            tp_rank=tp_rank)
        self.allocator = self._rooms.allocator
        #: this shell's own per-room state (merge buffer, result, latch), beside the machine's records
        self._table = ShellRooms()
        log.info("rank %d: receive pool of %d blocks x %d tokens, %.1f MiB on %s", tp_rank,
                 self.layout.num_blocks, self.layout.block_size, self.layout.nbytes / 2**20, device)
        self._monitor = threading.Thread(target=self._monitor_loop, name=f"embresume-lang-r{tp_rank}-monitor",
                                         daemon=True)
        self._monitor.start()
        if connect:
            try:
                self.connect()
            except BaseException:
                self.close()
                raise

    @property
    def _reqs(self) -> dict:
        """room -> the machine's record with this shell's result beside it (tests, tools: a snapshot)."""
        return {room: _ReqView(e) for room, e in list(self._table.items())}

    # ------------------------------------------------------------ the machine's actions
    def _run(self, actions: list) -> list:
        """(lock held) Carry out the machine's actions in order, record the machine's
        tally, then wake the waiters of the rooms a ``Notify`` named, last: a woken
        caller goes straight for the lock (``result``).  Returns the :class:`Copy`
        jobs with their entries of this shell's table, run outside the lock."""
        copies = []
        wake, finished = [], []
        i = 0
        while i < len(actions):
            a = actions[i]
            i += 1
            t = type(a)
            if t is Send:
                enc = self._encoders.get(a.address)
                link = enc.link if enc is not None else None
                try:
                    if link is None or not link.alive:
                        raise PeerError(f"not connected ({(enc.reason if enc else '') or 'connection lost'})")
                    link.channel.send(a.msg)
                except PeerError as e:
                    actions.extend(self._rooms.send_failed(a.address, a.msg, str(e)))
            elif t is Notify:
                req = a.req
                if req.tracker.status is Status.Failed:
                    log.warning("room %r failed: %s", req.room, req.reason)
                e = self._table.of(req)
                if e is not None:
                    wake.append(e.latch)
                finished.append(req.room)
            elif t is Copy:
                copies.append((a, self._table.of(a.req)))
            elif t is ZeroCopy:
                self._reads.zero_copy(self._table.of(a.req), a.blocks, a.tokens, _PoolLease(self, a.lease))
            elif t is Complete:
                self._reads.complete(self._table.of(a.req))
            elif t is Discard:
                self._table.discard(a.req)
            elif t is Connect:
                self._start_connecting(self._encoders[a.address])
            elif t is TearDown:
                enc = self._encoders.get(a.address)
                if enc is not None and enc.link is not None:
                    self._link_lost(enc, enc.link, a.reason)
            else:  # pragma: no cover - a machine action this shell does not know is a bug
                raise TypeError(f"unknown action {a!r}")
        tally = self._rooms.stats
        if tally:
            tally.record()          # the machine's counts, into self.stats, after its events
        for latch in wake:
            latch.set()
        if finished:
            self._finished.add(finished)
        return copies

    # ------------------------------------------------------------ connections
    def _session(self) -> str:
        # one session id per connection: an encoder never confuses a reconnection
        # with the connection it replaces, and never lets a session be taken over
        return f"{self.session_id}-c{next(self._connections)}"

    def _encoder(self, address: Optional[str] = None) -> _Encoder:
        """The record of ``address`` (default: config.encoder_endpoint), created on first use."""
        address = self.config.encoder_endpoint if address is None else address
        with self._lock:
            enc = self._encoders.get(address)
            if enc is None:
                enc = self._encoders[address] = _Encoder(_check_address(address), self._rooms.enc(address))
            return enc

    def connect(self, encoder: Optional[str] = None, timeout: Optional[float] = None) -> None:
        """Connect to ``encoder`` (default ``config.encoder_endpoint``) now and
        wait for it; a no-op when already connected.  Raises PeerError."""
        enc = self._encoder(encoder)
        with self._lock:
            if self._closed:
                raise PeerError("endpoint is closed")
            if enc.state == "up":
                return
            enc.retry_at = 0.0              # an explicit connect does not wait out a back-off
            self._start_connecting(enc)
        timeout = self.config.handshake_timeout * 3 if timeout is None else timeout
        if not enc.connected.wait(timeout) or enc.state != "up":
            raise PeerError(f"cannot connect to the encoder at {enc.address}: {enc.reason or 'timed out'}")

    def _start_connecting(self, enc: _Encoder) -> None:
        """(lock held) Start the handshake with ``enc`` off the caller's thread."""
        if enc.state in ("connecting", "up") or self._closed:
            return
        enc.state = "connecting"
        enc.connected.clear()
        enc.thread = threading.Thread(target=self._connector, args=(enc,), daemon=True,
                                      name=f"embresume-lang-r{self.tp_rank}-connect")
        enc.thread.start()

    def _connector(self, enc: _Encoder) -> None:
        delay = enc.retry_at - time.monotonic()
        if delay > 0:
            self._stop.wait(delay)
        link, err = None, None
        if not self._stop.is_set():
            try:
                link = self._handshaker.handshake(enc.address, functools.partial(self._link_lost, enc))
            except Exception as e:  # any failure ends this attempt; the requests are told
                err = e
        with self._lock:
            if link is not None and not self._closed:
                enc.link, enc.state, enc.reason, enc.transport = link, "up", "", link.transport
                if enc.connections:
                    log.info("rank %d reconnected to the encoder at %s", self.tp_rank, enc.address)
                    self.stats["reconnects"] += 1
                enc.connections += 1
                enc.failures = 0
                enc.connected.set()
                link.channel.start(lambda ch, m: self._on_message(enc, m),
                                   lambda ch, e: self._on_channel_error(enc, e),
                                   lambda ch: self._link_lost(enc, link, "control channel closed by the encoder"))
                self._run(self._rooms.connected(enc.address, link.session_id))
                return
            if link is not None:       # closed meanwhile
                link.close()
            reason = "endpoint closed" if self._closed else f"{type(err).__name__}: {err}"
            enc.state, enc.reason = "down", reason
            enc.failures += 1
            enc.retry_at = time.monotonic() + min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (enc.failures - 1))
            (log.warning if enc.failures == 1 else log.debug)(
                "rank %d cannot connect to the encoder at %s: %s (retried on the next request for it, "
                "with back-off up to %.1fs)", self.tp_rank, enc.address, reason, BACKOFF_CAP)
            enc.connected.set()
            self._run(self._rooms.connect_failed(enc.address, reason))

    # ------------------------------------------------------------ requests
    def request(self, room: P.Room, required_dst_info_num: int = 1, *, encoder: Optional[str] = None,
                expected_tokens: Optional[int] = None) -> Status:
        """Start receiving ``room`` from ``encoder`` (default ``config.encoder_endpoint``).

        Non-blocking: allocates and sends INIT, or queues for blocks, or (for
        an encoder not connected yet) starts the handshake on a thread of the
        endpoint and returns ``Bootstrapping``.  ``expected_tokens`` (a size
        hint) allocates exactly ``ceil(expected_tokens / block_size)`` blocks,
        so a correct hint never needs a resume; a low hint resumes, a high one
        wastes only the difference.  Bad arguments raise
        :class:`~embresume.errors.InvalidArgument` before anything is allocated."""
        n = check_request_args(room, required_dst_info_num, expected_tokens)
        enc = self._encoder(encoder)
        with self._lock:
            if self._closed:
                raise PeerError("endpoint is closed")
            actions = self._rooms.request(room, enc.address, n, expected_tokens, time.monotonic())
            e = self._table.add(self._rooms.reqs[room])
            self._run(actions)
            return e.req.tracker.status

    def track_finished(self) -> None:
        """From now on, record every room whose request reaches Success or Failed,
        for :meth:`take_finished` (:class:`~embresume.shell_rooms.FinishedRooms`)."""
        with self._lock:
            self._finished.track()

    def finished_pending(self) -> bool:
        """Whether :meth:`take_finished` has something (one read, no lock)."""
        return self._finished.pending()

    def take_finished(self) -> list:
        """The rooms whose request reached Success or Failed since the last call,
        in order (its :meth:`poll` tells a room's status now); never blocks."""
        return self._finished.take()

    def poll(self, room: P.Room) -> Status:
        """Non-blocking: never waits for the endpoint's lock or a copy."""
        e = self._table.get(room)
        if e is None:
            raise UnknownRoom(f"room {room!r} is not requested on this endpoint (or its result was collected)")
        return e.req.tracker.status

    def result(self, room: P.Room) -> EmbeddingResult:
        """Pop the merged result of a room that reached Success.  A room that
        failed is popped too and raises :class:`~embresume.errors.TransferFailed`
        (the subclass of its code: :class:`~embresume.errors.RoomBusy`,
        :class:`~embresume.errors.NotPublished`, ...)."""
        with self._lock:
            try:
                self._rooms.collect(room)
            except TransferFailed:
                self._table.drop(room)      # the machine let go of it too
                raise
            return self._table.drop(room).result

    def failure_reason(self, room: P.Room) -> str:
        """Why ``room`` failed, for people ("" unless it is here and failed)."""
        with self._lock:
            e = self._table.get(room)
            return e.req.reason if e else ""

    def failure_code(self, room: P.Room) -> FailCode:
        """Why ``room`` failed, for code: the encoder's
        :class:`~embresume.errors.FailCode` when it refused or failed the room
        (BUSY, TP_GROUP, NOT_PUBLISHED, ...), this endpoint's own otherwise
        (TIMEOUT, PEER_LOST, UNREACHABLE, ...); NONE unless it is here and failed."""
        with self._lock:
            e = self._table.get(room)
            return e.req.code if e else FailCode.NONE

    def history(self, room: P.Room) -> list[Status]:
        with self._lock:
            return list(self._table.need(room).req.tracker.history)

    def wait(self, room: P.Room, timeout: Optional[float] = None) -> Status:
        """Block until ``room`` is terminal or ``timeout`` passed; returns its status."""
        with self._lock:
            e = self._table.need(room)
        e.latch.wait(timeout)
        return e.req.tracker.status

    def recv(self, room: P.Room, timeout: Optional[float] = None, required_dst_info_num: int = 1, *,
             encoder: Optional[str] = None, expected_tokens: Optional[int] = None) -> EmbeddingResult:
        """Blocking convenience: request ``room`` (unless already requested),
        wait for a terminal status, return the merged result.  Raises
        :class:`~embresume.errors.TransferFailed` when the room failed and
        :class:`~embresume.errors.EmbResumeTimeout` (the room aborted) when
        ``timeout`` (default ``request_timeout``) ran out."""
        with self._lock:
            e = self._table.get(room)
            if e is not None and e.req.tracker.status is Status.Success:
                return self.result(room)        # it arrived before we were asked
        if e is None or e.req.tracker.status is Status.Failed:
            self.request(room, required_dst_info_num, encoder=encoder, expected_tokens=expected_tokens)
        timeout = self.config.request_timeout if timeout is None else timeout
        st = self.wait(room, timeout)
        if not st.terminal:
            self.abort(room, f"no result within {timeout}s")
            with self._lock:
                e = self._table.get(room)
                if e is not None and e.req.tracker.status is Status.Failed:
                    self._run(self._rooms.forget(room))
                    self._table.drop(room)
                    raise EmbResumeTimeout(f"room {room!r}: no result within {timeout}s "
                                           f"(it was {st.name}; aborted)")
        return self.result(room)

    def abort(self, room: P.Room, reason: str = "aborted by the language side") -> None:
        with self._lock:
            self._run(self._rooms.abort(room, reason))

    # single-encoder conveniences (the default encoder's connection)
    @property
    def connected(self) -> bool:
        enc = self._encoders.get(self.config.encoder_endpoint)
        return enc is not None and enc.state == "up"

    @property
    def channel(self) -> Optional[Channel]:
        enc = self._encoders.get(self.config.encoder_endpoint)
        return enc.link.channel if enc is not None and enc.link is not None else None

    @property
    def transport_name(self) -> str:
        """The transport of the default encoder's (last) connection."""
        enc = self._encoders.get(self.config.encoder_endpoint)
        return enc.transport if enc is not None else ""

    def encoders(self) -> list[dict]:
        """The encoders this endpoint knows, their state and transport."""
        with self._lock:
            return [{"address": e.address, "state": e.state, "transport": e.link.transport if e.link else "",
                     "rooms": self._rooms.live_rooms(e.address), "reason": e.reason}
                    for e in self._encoders.values()]

    # ------------------------------------------------------------ pool reads and copies
    def _copy(self, job: Copy, e: RoomIO) -> Optional[str]:
        """Copy a job's tokens into the request's merge buffer (``e``: its entry
        of this shell's table), outside the lock; returns why it failed, or None."""
        return self._reads.copy(e, job.blocks, job.tokens)

    def _release_pool_lease(self, lease: int) -> None:
        with self._lock:
            self._run(self._rooms.lease_returned(lease))

    # ------------------------------------------------------------ messages
    def _on_message(self, enc: _Encoder, msg: P.Message) -> None:
        """Runs on ``enc``'s channel reader thread."""
        link = enc.link
        if link is None:
            return
        link.last_seen = time.monotonic()
        t = type(msg)
        if t is P.StatusMsg or t is P.Progress:
            with self._lock:
                if enc.link is not link:
                    return
                rooms = self._rooms
                block = rooms.aux_block(enc.address, msg)
                aux = None if block is None else self._reads.aux(block)     # the event takes it as data
                acts = (rooms.status(enc.address, msg, time.monotonic(), aux) if t is P.StatusMsg
                        else rooms.progress(enc.address, msg, aux))
                jobs = self._run(acts)
            for job, e in jobs:
                link.busy = True  # the monitor does not count silence while we copy
                try:
                    err = self._copy(job, e)  # outside the lock: poll() never waits for it
                finally:
                    link.busy = False
                    link.last_seen = time.monotonic()
                with self._lock:
                    self._run(self._rooms.copied(job.req, job.tokens, job.end, err, time.monotonic()))
            return
        if t is P.Heartbeat:
            self._noop(enc, link)
            return
        if t is P.Bye:
            self._link_lost(enc, link, f"encoder closed the connection: {msg.reason}", clean=True)
            return
        plog(logging.WARNING, "unexpected", "ignoring unexpected %s from the encoder at %s", t.__name__,
             enc.address)
        self._noop(enc, link)

    def _noop(self, enc: _Encoder, link: Link) -> None:
        """A frame that does nothing: within the link's no-op rate, or the link goes."""
        if link.noop is None:
            link.noop = noop_bucket(self.config.heartbeat_interval)
        if not link.noop.take():
            self.stats["noop_flood"] += 1
            self._link_lost(enc, link, f"more than {link.noop.rate:.0f} no-op frames a second: disconnected")

    # ------------------------------------------------------------ liveness
    def _on_channel_error(self, enc: _Encoder, err: Exception) -> None:
        self.stats["bad_messages"] += 1
        plog(logging.WARNING, "bad_message", "bad control message from the encoder at %s: %s (%d so far)",
             enc.address, err, self.stats["bad_messages"])

    def _link_lost(self, enc: _Encoder, link: Link, reason: str, clean: bool = False) -> None:
        """``link`` to ``enc`` is gone: the machine fails its rooms and frees what
        was parked for it; the link is closed.  The next request naming ``enc`` reconnects."""
        with self._lock:
            if enc.link is not link or not link.alive:
                return
            link.alive = False
            enc.link = None
            enc.state, enc.reason = "down", reason
            enc.retry_at = 0.0
            if not self._closed:
                (log.info if clean else log.error)("rank %d: encoder at %s %s", self.tp_rank, enc.address,
                                                    reason if clean else f"lost: {reason}")
            self._run(self._rooms.link_lost(enc.address, reason))
        # closed on a thread of its own: this may run on the link's reader thread,
        # which the close joins (and a ZeroMQ hub must not close under its own loop)
        threading.Thread(target=_close_quietly, args=(link,), name="embresume-link-close", daemon=True).start()

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.config.heartbeat_interval):
            try:
                self._monitor_once()
            except Exception:  # the monitor must outlive any one bad iteration
                log.exception("language monitor iteration failed")

    def _monitor_once(self) -> None:
        c = self.config
        with self._lock:
            links = [(e, e.link) for e in self._encoders.values() if e.link is not None and e.link.alive]
        for enc, link in links:
            link.hb_seq += 1
            try:
                link.channel.send(P.Heartbeat(link.hb_seq, time.time_ns()))
            except PeerError as e:
                self._link_lost(enc, link, str(e))
                continue
            silent = time.monotonic() - link.last_seen
            stalled = link.channel.stalled_for()
            if stalled > c.peer_timeout:
                self.stats["stalled_links"] += 1
                self._link_lost(enc, link, f"stuck: its control ring made no room for {stalled:.1f}s (it does not "
                                           f"read; peer_timeout {c.peer_timeout}s)")
            elif silent > c.peer_timeout and not link.busy:
                self._link_lost(enc, link, f"no message for {silent:.1f}s (peer_timeout {c.peer_timeout}s)")
            elif link.sock is not None and unix.closed_by_peer(link.sock):
                self._link_lost(enc, link, f"the encoder's handshake socket closed (process {link.peer_pid} "
                                "exited or closed its endpoint)")
            elif link.pid_check and link.peer_pid and not _pid_alive(link.peer_pid):
                self._link_lost(enc, link, f"encoder process {link.peer_pid} exited")
        with self._lock:
            # timeouts, and encoders stuck on an abort or on held blocks (TearDown)
            self._run(self._rooms.tick(time.monotonic()))
        self.stats.pool(self.allocator.used_blocks, self.layout.num_blocks)

    # ------------------------------------------------------------ teardown
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            encs = list(self._encoders.values())
        self._stop.set()
        links = []
        with self._lock:
            self._run(self._rooms.close())
            for enc in encs:
                if enc.link is not None and enc.link.alive:
                    links.append(enc.link)
                    try:
                        enc.link.channel.send(P.Bye("language endpoint closed"))
                    except PeerError:
                        pass
                    enc.link.alive = False
                enc.link, enc.state = None, "down"
        for enc in encs:
            t = enc.thread
            if t is not None and t is not threading.current_thread():
                t.join(timeout=self.config.handshake_timeout + 1)
        if self._monitor is not threading.current_thread():
            self._monitor.join(timeout=2)
        for link in links:
            _close_quietly(link)
        self._handshaker.unexport_all()
        self._transports.close()
        self.pool.close()

    def __enter__(self) -> "LanguageEndpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _PoolLease:
    """Blocks of the receive pool lent to a zero-copy result until it is released."""

    __slots__ = ("endpoint", "lease")

    def __init__(self, endpoint: "LanguageEndpoint", lease: int):
        self.endpoint, self.lease = endpoint, lease

    @property
    def blocks(self) -> list:
        return self.endpoint._rooms.lease_blocks(self.lease)

    def give_back(self) -> None:
        self.endpoint._release_pool_lease(self.lease)


def _close_quietly(link: Link) -> None:
    try:
        link.close()
    except Exception:
        log.debug("closing a lost link failed", exc_info=True)


class _ReqView:
    """A machine's request record, read through, with the shell's ``result``
    beside it (``LanguageEndpoint._reqs``: tests and tools).  A field set on
    it is set on the record: a test that forces a timeout sets ``deadline``."""

    __slots__ = ("_e",)

    def __init__(self, e: RoomIO):
        object.__setattr__(self, "_e", e)

    @property
    def result(self):
        return self._e.result

    def __getattr__(self, name: str):
        return getattr(self._e.req, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._e.req, name, value)
