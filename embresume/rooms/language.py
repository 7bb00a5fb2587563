"""The language side's rooms: requests, resumes, timeouts and the block ledger, with no I/O.

:class:`LanguageRooms` holds every request (room) of one
:class:`~embresume.language.LanguageEndpoint` and every block of its receive
pool.  The endpoint feeds it events through one entry,
:meth:`LanguageRooms.handle` (an event dataclass in, the list of actions out;
the method of each event's name is a thin wrapper of it), and carries out
the actions it returns, in order::

    event (handle(...) / method)                    actions it may return
    --------------------------------------------    --------------------------------------------
    RequestRoom / request(room, address, ...)       Connect, Send(INIT), Notify
    LinkUp / connected, LinkFailed / connect_failed Send(INIT) for the rooms that waited / Notify
    StatusReceived / status(address, StatusMsg)     Copy, ZeroCopy, Complete, Send(RESUME/ABORT), Notify
    ProgressReceived / progress(address, Progress)  Copy (part of a chunk, while the rest is written)
      (both with ``aux``: the aux record the endpoint read from :meth:`LanguageRooms.aux_block`)
    Copied / copied(req, tokens, end, error)        Complete, Send(RESUME), Notify
    SendFailed / send_failed(address, msg)          Notify (the room fails: unreachable)
    AbortRoom, Tick, LinkLost, Close                Send(ABORT), Discard, Notify, TearDown
    LeaseReturned / lease_returned(lease)           Send(INIT/RESUME) of rooms waiting for blocks
    Forget / forget(room)                           (none: a failed request leaves uncollected)

The endpoint runs every action under its lock except :class:`Copy`, which
it runs on the link's reader thread outside the lock (the request is in
phase ``COPYING`` meanwhile and owns its blocks until :class:`Copied`).
The machine takes data, never callbacks that do I/O: what it needs of pool
memory comes in the events, and its counts are kept in its
:class:`~embresume.rooms.Tally`, which the endpoint records after the event.
A request's record (:class:`Req`) is the machine's alone; what the endpoint
keeps for it is in the endpoint's own table (:mod:`embresume.shell_rooms`).

Each request has one :class:`Phase`, changed only by
:meth:`LanguageRooms._set_phase` and only along :data:`TRANSITIONS` (a
change the table lacks raises :class:`~embresume.rooms.PhaseError`).

The block ledger (docs/design.md, section 5): every pool block has exactly
one owner at each moment, and only this class moves blocks between owners::

    allocator (free) --allocate--> request --chunk copied--> allocator
                                      |--failed, encoder told to abort--> quarantine --its Failed / link gone--> allocator
                                      |--encoder reported an unsafe write--> held --link gone--> allocator
                                      |--one chunk, consecutive blocks--> lease --result released--> allocator
                                      '--failed, encoder gone--> allocator

A quarantined room or held block that waits longer than the quarantine
timeout makes its encoder count as stuck: :class:`TearDown`, after which the
endpoint reports :meth:`link_lost` and everything parked for it is freed.
:meth:`ledger` lists the owners (the tests check it after every step).

A failed request keeps why (``Req.code``, a :class:`~embresume.errors.FailCode`):
the encoder's code for a Failed STATUS, this side's own for a timeout, a lost
or unreachable encoder, a bad message, a failed copy, an abort or a close;
:meth:`LanguageRooms.collect` raises it as :meth:`TransferFailed.of
<embresume.errors.TransferFailed.of>` (RoomBusy, NotPublished, ...).
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass
from typing import Callable, Optional

from .. import protocol as P
from ..blocks import BlockAllocator
from ..errors import (AllocatorError, FailCode, InvalidArgument, PeerError, ProtocolError, RoomInUse, TransferFailed,
                      UnknownRoom)
from ..metrics import EndpointStats
from ..planner import plan_chunk
from ..status import Status, StatusTracker
from . import Tally, check_phase

#: sanity bound on a request's total tokens as read from aux (a corrupt or
#: hostile aux record must not make us allocate terabytes); also the largest hint
MAX_REQUEST_TOKENS = 1 << 24


# ---------------------------------------------------------------- phases
class Phase(enum.Enum):
    """Where one request is (``Req.phase``).  Only
    :meth:`LanguageRooms._set_phase` changes it, and only along
    :data:`TRANSITIONS`; the public :class:`~embresume.status.Status`
    (``Req.tracker``) is coarser and has its own table."""
    BOOTSTRAPPING = "bootstrapping"     # created; its encoder's link is not up yet
    WAITING_BLOCKS = "waiting_blocks"   # queued for pool blocks (its first chunk, or the rest after a chunk)
    ASKED = "asked"                     # INIT / RESUME out with its blocks: waits for PROGRESS / STATUS
    COPYING = "copying"                 # a Copy out of its blocks runs outside the lock
    SUCCEEDED = "succeeded"             # terminal: its result is there (Complete or ZeroCopy)
    FAILED = "failed"                   # terminal: failed; its blocks freed or parked
    FAILED_COPYING = "failed_copying"   # failed while a Copy ran: its blocks go to ``Req.release`` when it ends


_P = Phase
#: every phase change a request may make, and what makes it (docs/design.md,
#: "Room state machines" draws it); anything else raises PhaseError
TRANSITIONS: dict[Phase, dict[Phase, str]] = {
    _P.BOOTSTRAPPING: {
        _P.ASKED: "connected / request: blocks allocated, INIT sent",
        _P.WAITING_BLOCKS: "connected / request: no blocks (or others wait first): queued",
        _P.FAILED: "connect_failed, link_lost, tick, abort, close, send_failed",
    },
    _P.WAITING_BLOCKS: {
        _P.ASKED: "blocks freed (lease_returned, a chunk, a failure): INIT / RESUME sent",
        _P.FAILED: "tick, abort, link_lost, close; the link went before the INIT",
    },
    _P.ASKED: {
        _P.COPYING: "status (a chunk) / progress (part of it): Copy",
        _P.SUCCEEDED: "status: the whole request in consecutive blocks, ZeroCopy",
        _P.FAILED: "status Failed or a bad message, tick, abort, link_lost, close, send_failed",
    },
    _P.COPYING: {
        _P.ASKED: "copied: a part (progress) landed, or the copy failed (then FAILED)",
        _P.WAITING_BLOCKS: "copied: a chunk landed, the rest needs blocks (then ASKED at once when free)",
        _P.SUCCEEDED: "copied: the last chunk landed, Complete",
        _P.FAILED_COPYING: "a failure while the copy runs (status, tick, abort, link_lost, close)",
    },
    _P.FAILED_COPYING: {
        _P.FAILED: "copied: the blocks go where the failure said (free, quarantine, held)",
    },
    _P.SUCCEEDED: {},
    _P.FAILED: {},
}


# ---------------------------------------------------------------- events
# what the endpoint feeds LanguageRooms.handle() (or the method of the same
# name, a thin wrapper); ``now`` is the endpoint's monotonic clock
@dataclass(slots=True)
class RequestRoom:
    """The application asks for ``room`` from the encoder at ``address`` (arguments checked by the endpoint)."""
    room: P.Room
    address: str
    required_dst_info_num: int
    hint: Optional[int]
    now: float


@dataclass(slots=True)
class LinkUp:
    """The handshake with ``address`` is done: a link with session id ``session``."""
    address: str
    session: str


@dataclass(slots=True)
class LinkFailed:
    """The handshake with ``address`` failed."""
    address: str
    reason: str


@dataclass(slots=True)
class StatusReceived:
    """A decoded STATUS from the encoder at ``address``; ``aux``: ``(total
    tokens, aux record)`` as the endpoint read it from the block
    :meth:`LanguageRooms.aux_block` named (None when it named none)."""
    address: str
    msg: P.StatusMsg
    now: float
    aux: Optional[tuple] = None


@dataclass(slots=True)
class ProgressReceived:
    """A decoded PROGRESS (part of the current chunk landed) from ``address``
    (``aux`` as in :class:`StatusReceived`)."""
    address: str
    msg: P.Progress
    aux: Optional[tuple] = None


@dataclass(slots=True)
class Copied:
    """A :class:`Copy` ended (``error``: why it failed, None when it did not)."""
    req: "Req"
    tokens: int
    end: Optional[tuple]
    error: Optional[str]
    now: float


@dataclass(slots=True)
class SendFailed:
    """A :class:`Send` could not go out."""
    address: str
    msg: P.Message
    reason: str


@dataclass(slots=True)
class AbortRoom:
    """The application aborts ``room``."""
    room: P.Room
    reason: str


@dataclass(slots=True)
class Tick:
    """The clock."""
    now: float


@dataclass(slots=True)
class LinkLost:
    """The link to ``address`` is gone (or was torn down)."""
    address: str
    reason: str


@dataclass(slots=True)
class Close:
    """The endpoint closes."""


@dataclass(slots=True)
class LeaseReturned:
    """A zero-copy result was released."""
    lease: int


@dataclass(slots=True)
class Forget:
    """The endpoint drops ``room``'s failed request without collecting it (it
    reports its own error for it, e.g. the timeout of a blocking ``recv``)."""
    room: P.Room


# ---------------------------------------------------------------- actions
@dataclass(slots=True)
class Connect:
    """Start the handshake with the encoder at ``address`` (a no-op when under way)."""
    address: str


@dataclass(slots=True)
class Send:
    """Send ``msg`` on the link to ``address``; when it cannot go out, report
    :meth:`LanguageRooms.send_failed`."""
    address: str
    msg: P.Message


@dataclass(slots=True)
class Copy:
    """Copy ``tokens`` tokens out of ``blocks`` into the request's merge buffer,
    outside the lock; then report :meth:`LanguageRooms.copied` with the same
    ``tokens`` and ``end`` (``(chunk_tokens, complete)`` for a chunk's final
    STATUS, None for a PROGRESS)."""
    req: "Req"
    blocks: list
    tokens: int
    end: Optional[tuple]


@dataclass(slots=True)
class ZeroCopy:
    """Success without a copy: the result is a view of ``blocks`` (``tokens``
    tokens), which stay lent to it under ``lease`` until it is released."""
    req: "Req"
    blocks: list
    tokens: int
    lease: int


@dataclass(slots=True)
class Complete:
    """Success: the merge buffer holds all the tokens; make it the result."""
    req: "Req"


@dataclass(slots=True)
class Discard:
    """The request failed: drop its merge buffer (if the endpoint made one)."""
    req: "Req"


@dataclass(slots=True)
class Notify:
    """The request reached a terminal status: wake its waiters."""
    req: "Req"


@dataclass(slots=True)
class TearDown:
    """The encoder at ``address`` counts as stuck: tear its link down (then
    report :meth:`LanguageRooms.link_lost`)."""
    address: str
    reason: str



def check_request_args(room, required_dst_info_num, expected_tokens) -> int:
    """A request's arguments, checked before anything is allocated
    (:class:`~embresume.errors.InvalidArgument`); returns ``required_dst_info_num``."""
    P.check_room(room)
    n = required_dst_info_num
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 0xFFFF:
        raise InvalidArgument(f"required_dst_info_num must be an int in [1, 65535], got {n!r}")
    if expected_tokens is not None and (isinstance(expected_tokens, bool) or not isinstance(expected_tokens, int)
                                        or not 1 <= expected_tokens <= MAX_REQUEST_TOKENS):
        raise InvalidArgument(f"expected_tokens must be an int in [1, {MAX_REQUEST_TOKENS}], "
                              f"got {expected_tokens!r}")
    return n

# ---------------------------------------------------------------- state
class Req:
    """One request's state, the machine's alone.  What the endpoint keeps for
    it (its merge buffer, its result, its latch) is in the endpoint's own
    table (:class:`~embresume.shell_rooms.ShellRooms`), never here."""

    __slots__ = ("room", "required_dst_info_num", "deadline", "enc", "nonce", "hint", "t0", "tracker", "blocks",
                 "sent_tokens", "total_tokens", "chunks", "aux", "reason", "cause", "code", "phase", "landed",
                 "release")

    def __init__(self, room: P.Room, required_dst_info_num: int, now: float, deadline: float, enc: "Enc",
                 nonce: int, hint: Optional[int]):
        self.room = room
        self.required_dst_info_num = required_dst_info_num
        self.deadline = deadline
        self.enc = enc
        self.nonce = nonce
        self.hint = hint
        self.t0 = now
        self.tracker = StatusTracker()
        self.blocks: list = []
        self.sent_tokens = 0
        self.total_tokens = 0
        self.chunks = 0
        self.aux = None
        self.reason = ""
        self.cause = ""
        self.code = FailCode.NONE   # why it failed: the encoder's code, or this side's own
        self.phase = Phase.BOOTSTRAPPING
        self.landed = 0        # tokens of the current chunk already copied (pipelined chunks)
        self.release = "free"  # where its blocks go when a copy running at its failure ends

    @property
    def waiting_alloc(self) -> bool:
        """Queued for pool blocks."""
        return self.phase is Phase.WAITING_BLOCKS

    @property
    def copying(self) -> bool:
        """A Copy out of its blocks runs (the request owns them until it ends)."""
        return self.phase is Phase.COPYING or self.phase is Phase.FAILED_COPYING


class Enc:
    """What the machine knows of one encoder (by address), across reconnections:
    whether a link is up (and its session id), rooms waiting for it, and the
    blocks parked for it (``quarantine``: an ABORT went out, freed at its
    answer; ``held``: a failed write into them may still land, freed when the
    link goes)."""

    __slots__ = ("address", "up", "session", "pending", "quarantine", "quarantined_at", "held", "held_at")

    def __init__(self, address: str):
        self.address = address
        self.up = False
        self.session = ""
        self.pending: list = []
        self.quarantine: dict = {}
        self.quarantined_at: dict = {}
        self.held: dict = {}
        self.held_at: dict = {}


class LanguageRooms:
    """The language side's room state machine (see the module docstring).

    The one look at pool memory the machine needs, the aux record of a
    request's first block (rule 3), comes in as data: before it feeds a
    STATUS or PROGRESS, the endpoint asks :meth:`aux_block` which block's aux
    that message needs (None: none) and passes ``(total tokens, aux
    record)`` read from it in the event's ``aux``.  ``read_aux(block)``
    does that read for a driver without a pool of its own to read (a test):
    the :meth:`status` and :meth:`progress` wrappers call it, before the
    event, when they are given no ``aux``; the endpoint gives none.

    ``stats`` (``machine.stats``) is a :class:`~embresume.rooms.Tally`: the
    machine's counts as data, which the endpoint records into its
    :class:`~embresume.metrics.EndpointStats` (``stats=``, bound here) after
    each event."""

    def __init__(self, *, num_blocks: int, block_size: int, row_bytes: int, read_aux: Optional[Callable] = None,
                 stats: Optional[EndpointStats] = None, default_allocate_tokens: int, max_chunk_tokens: int = 0,
                 request_timeout: float = 60.0, quarantine_timeout: float = 60.0, zero_copy: bool = False,
                 share_limit: int = 0, tp_rank: int = 0):
        self.tp_rank = tp_rank
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.row_bytes = row_bytes
        self.read_aux = read_aux
        #: the machine's counts, recorded by the endpoint outside its events
        self.stats = Tally(stats)
        self.default_allocate_tokens = default_allocate_tokens
        self.max_chunk_tokens = max_chunk_tokens
        self.request_timeout = request_timeout
        self.quarantine_timeout = quarantine_timeout
        self.zero_copy = zero_copy
        #: the most blocks one encoder's requests, quarantine and held blocks may take; 0: no cap
        self.share_limit = share_limit
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.reqs: dict = {}
        self.encs: dict[str, Enc] = {}
        self.leases: dict[int, tuple] = {}          # lease id -> (room, blocks)
        self._lease_ids = 0
        self._nonce = 0
        self._waiting: collections.deque = collections.deque()
        self._draining = False          # _drain_waiting is running (it is not re-entrant)
        self._capped = False            # the last _try_allocate was refused by the encoder's share
        self._drain_held = False        # a link's rooms are being failed: drain once at the end
        self.closed = False

    @staticmethod
    def _set_phase(req: Req, new: Phase) -> None:
        """The one place a request's phase changes: along :data:`TRANSITIONS` only."""
        check_phase(TRANSITIONS, "request", req.phase, new)
        req.phase = new

    def enc(self, address: str) -> Enc:
        e = self.encs.get(address)
        if e is None:
            e = self.encs[address] = Enc(address)
        return e

    # ------------------------------------------------------------ events
    def handle(self, ev) -> list:
        """The one entry: feed one event (a dataclass of this module's
        events), get the actions to carry out, in order.  A request that is
        refused raises (RoomInUse, InvalidArgument, PeerError) and changes nothing."""
        out: list = []
        try:
            on = self._HANDLERS[type(ev)]
        except KeyError:
            raise TypeError(f"not an event of the language machine: {ev!r}") from None
        on(self, ev, out)
        return out

    # the per-event methods: thin wrappers of handle() for the endpoint and the tests
    def request(self, room: P.Room, address: str, required_dst_info_num: int, hint: Optional[int],
                now: float) -> list:
        return self.handle(RequestRoom(room, address, required_dst_info_num, hint, now))

    def connected(self, address: str, session: str) -> list:
        return self.handle(LinkUp(address, session))

    def connect_failed(self, address: str, reason: str) -> list:
        return self.handle(LinkFailed(address, reason))

    def status(self, address: str, msg: P.StatusMsg, now: float, aux: Optional[tuple] = None) -> list:
        if aux is None:
            aux = self._read_aux_for(address, msg)
        return self.handle(StatusReceived(address, msg, now, aux))

    def progress(self, address: str, msg: P.Progress, aux: Optional[tuple] = None) -> list:
        if aux is None:
            aux = self._read_aux_for(address, msg)
        return self.handle(ProgressReceived(address, msg, aux))

    def _read_aux_for(self, address: str, msg) -> Optional[tuple]:
        """(The wrappers, before the event) ``read_aux`` of the block the message needs, for a driver without a pool."""
        if self.read_aux is None:
            return None
        block = self.aux_block(address, msg)
        return None if block is None else self.read_aux(block)

    def copied(self, req: Req, tokens: int, end: Optional[tuple], error: Optional[str], now: float) -> list:
        return self.handle(Copied(req, tokens, end, error, now))

    def send_failed(self, address: str, msg: P.Message, reason: str) -> list:
        return self.handle(SendFailed(address, msg, reason))

    def abort(self, room: P.Room, reason: str) -> list:
        return self.handle(AbortRoom(room, reason))

    def tick(self, now: float) -> list:
        return self.handle(Tick(now))

    def link_lost(self, address: str, reason: str) -> list:
        return self.handle(LinkLost(address, reason))

    def close(self) -> list:
        return self.handle(Close())

    def lease_returned(self, lease: int) -> list:
        return self.handle(LeaseReturned(lease))

    def forget(self, room: P.Room) -> list:
        return self.handle(Forget(room))

    # ------------------------------------------------------------ queries (the endpoint reads, under its lock)
    def aux_block(self, address: str, msg) -> Optional[int]:
        """The pool block whose aux record the STATUS or PROGRESS ``msg`` from
        ``address`` needs (the first block of the request's first chunk, while
        its aux is unread), or None; the endpoint reads it and passes it in the event."""
        if type(msg) is P.StatusMsg and msg.status is not Status.Transferring and msg.status is not Status.Success:
            return None
        enc = self.encs.get(address)
        if enc is None or not enc.up or msg.room in enc.quarantine:
            return None
        req = self._live(enc, msg.room)
        if req is None or req.aux is not None or not req.blocks or req.phase is not Phase.ASKED:
            return None
        return req.blocks[0]

    def live_rooms(self, address: str) -> int:
        """Requests asked of the encoder at ``address`` that are not terminal yet."""
        enc = self.encs.get(address)
        return sum(1 for r in self.reqs.values() if r.enc is enc and not r.tracker.status.terminal) if enc else 0

    def lease_blocks(self, lease: int) -> list:
        """The blocks lent to a zero-copy result under ``lease`` (none once it is returned)."""
        entry = self.leases.get(lease)
        return list(entry[1]) if entry else []

    # ------------------------------------------------------------ requests
    def _on_request(self, ev: RequestRoom, out: list) -> None:
        """A new request for ``room`` from the encoder at ``address`` (arguments checked by the caller)."""
        room, address, required_dst_info_num, hint, now = ev.room, ev.address, ev.required_dst_info_num, ev.hint, ev.now
        if self.closed:
            raise PeerError("endpoint is closed")
        old = self.reqs.get(room)
        if old is not None and not old.tracker.status.terminal:
            raise RoomInUse(f"room {room!r} is already in flight")
        if old is not None and old.tracker.status is Status.Success:
            raise InvalidArgument(f"room {room!r} has a result nobody collected: call result() first")
        if old is not None and old.phase is Phase.FAILED_COPYING:
            raise RoomInUse(f"room {room!r} is still being released after a failure")
        if any(room in e.quarantine or room in e.held for e in self.encs.values()):
            raise RoomInUse(f"room {room!r} still waits for an encoder to confirm an abort")
        enc = self.enc(address)
        self._nonce += 1
        req = Req(room, required_dst_info_num, now, now + self.request_timeout, enc, self._nonce, hint)
        self.reqs[room] = req
        self.stats.request_started(hinted=hint is not None)
        if enc.up:
            self._admit(req, out)
        else:
            enc.pending.append(room)
            out.append(Connect(address))

    def _on_connected(self, ev: LinkUp, out: list) -> None:
        """A link to ``address`` is up: the rooms that waited for it are admitted."""
        address, session = ev.address, ev.session
        enc = self.enc(address)
        enc.up, enc.session = True, session
        pending, enc.pending = enc.pending, []
        for room in pending:
            req = self.reqs.get(room)
            if req is not None and req.enc is enc and req.phase is Phase.BOOTSTRAPPING:
                self._admit(req, out)

    def _on_connect_failed(self, ev: LinkFailed, out: list) -> None:
        """The handshake with ``address`` failed: the rooms that waited for it fail."""
        address, reason = ev.address, ev.reason
        enc = self.enc(address)
        pending, enc.pending = enc.pending, []
        for room in pending:
            req = self.reqs.get(room)
            if req is not None and req.enc is enc and not req.tracker.status.terminal:
                self._fail(req, f"cannot connect to the encoder at {address}: {reason}", out, notify=False,
                           cause="unreachable", code=FailCode.UNREACHABLE)

    def _first_tokens(self, req: Req) -> tuple[int, int]:
        """(tokens to ask for, the least worth taking) for a request's first chunk."""
        if req.hint is None:
            return self.default_allocate_tokens, 1
        want = req.hint
        cap = self.num_blocks * self.block_size
        if self.max_chunk_tokens:
            cap = min(cap, self.max_chunk_tokens)
        # a hint is served whole (no resume) unless the pool or max_chunk_tokens cannot hold it
        return want, min(want, cap)

    def _admit(self, req: Req, out: list) -> None:
        """The encoder is connected: allocate and send INIT, or queue."""
        if self._waiting or not self._try_allocate(req, out, *self._first_tokens(req)):
            self._set_phase(req, Phase.WAITING_BLOCKS)
            self._waiting.append(req.room)
            if self.share_limit and len(self._waiting) > 1:
                # requests at the head may wait for their encoder's share, not
                # for the pool: this one may be servable now
                self._drain_waiting(out)

    def charged(self, enc: Enc) -> int:
        """Blocks of the pool held for ``enc``: its requests', its quarantine, its held blocks."""
        n = sum(len(r.blocks) for r in self.reqs.values() if r.enc is enc)
        n += sum(len(b) for b in enc.quarantine.values())
        return n + sum(len(b) for b in enc.held.values())

    def _try_allocate(self, req: Req, out: list, tokens: int, min_tokens: int = 1) -> bool:
        """Allocate up to ``tokens`` tokens (at least ``min_tokens``) and send INIT/RESUME.
        False when the pool (or the encoder's share of it, ``_capped`` set) cannot."""
        self._capped = False
        if self.max_chunk_tokens:
            tokens = min(tokens, self.max_chunk_tokens)
        if self.share_limit:
            bs = self.block_size
            left = (self.share_limit - self.charged(req.enc)) * bs
            min_tokens = min(min_tokens, self.share_limit * bs)
            if left < min(min_tokens, tokens):
                self._capped = True
                return False
            tokens = min(tokens, left)
        blocks = self.allocator.allocate(tokens, req.room, min_tokens=min(min_tokens, tokens))
        if not blocks:
            return False
        req.blocks = blocks
        allocated = self.allocator.allocated_tokens(blocks)  # rule 2: what was really allocated
        enc = req.enc
        if not enc.up:
            self._fail(req, f"cannot reach the encoder at {enc.address}: not connected (connection lost)", out,
                       notify=False, cause="unreachable", code=FailCode.UNREACHABLE)
            return True
        fields = dict(room=req.room, endpoint=enc.address, dst_port=self.tp_rank, session_id=enc.session,
                      dst_blocks=tuple(blocks), required_dst_info_num=req.required_dst_info_num,
                      allocated_tokens=allocated, nonce=req.nonce)
        msg = P.Init(**fields) if req.chunks == 0 else P.Resume(**fields, sent_tokens=req.sent_tokens)
        out.append(Send(enc.address, msg))
        self._set_phase(req, Phase.ASKED)
        if req.chunks == 0:
            req.tracker.set(Status.WaitingForInput)
        else:
            self.stats["resumes"] += 1
        return True

    def _drain_waiting(self, out: list) -> None:
        """Serve queued allocations in FIFO order (resumes and inits alike).

        Not re-entrant: an allocation that fails its request frees blocks and
        calls back here; that inner call only lets the running loop go on.
        While ``_drain_held`` is set (a link's rooms are being failed one by
        one) nothing is drained."""
        if self._draining or self._drain_held:
            return
        self._draining = True
        waiting = self._waiting
        capped: list = []
        try:
            while waiting:
                room = waiting.popleft()
                req = self.reqs.get(room)
                if req is None or req.phase is not Phase.WAITING_BLOCKS:
                    continue
                if req.chunks == 0:
                    ok = self._try_allocate(req, out, *self._first_tokens(req))
                else:
                    ok = self._try_allocate(req, out, req.total_tokens - req.sent_tokens)
                if not ok:
                    if self._capped:
                        # its encoder used its share of the pool: it waits for
                        # that encoder, not in front of the others
                        capped.append(room)
                        continue
                    waiting.appendleft(room)     # still first in line
                    return
        finally:
            waiting.extendleft(reversed(capped))
            self._draining = False

    def collect(self, room: P.Room) -> Req:
        """The scheduler takes a terminal request away (its result, or its
        failure raised as :class:`TransferFailed`)."""
        req = self.reqs.get(room)
        if req is None:
            raise UnknownRoom(f"room {room!r} has no result here: never requested, or its result "
                              "was already collected")
        if req.tracker.status is Status.Failed:
            del self.reqs[room]
            raise TransferFailed.of(room, req.reason, req.code)
        if req.tracker.status is not Status.Success:
            raise InvalidArgument(f"room {room!r} is {req.tracker.status.name}, not Success: wait() or poll() first")
        del self.reqs[room]
        return req

    def _on_abort(self, ev: AbortRoom, out: list) -> None:
        room, reason = ev.room, ev.reason
        req = self.reqs.get(room)
        if req is not None and not req.tracker.status.terminal:
            self._fail(req, reason, out, notify=True, cause="aborted", code=FailCode.ABORTED)

    def _on_send_failed(self, ev: SendFailed, out: list) -> None:
        """A Send could not go out (the link is gone or will not take it)."""
        address, msg, reason = ev.address, ev.msg, ev.reason
        enc = self.enc(address)
        if isinstance(msg, P.Abort):
            self._release_quarantine(enc, msg.room)
            self._drain_waiting(out)
        elif isinstance(msg, (P.Init, P.Resume)):
            req = self.reqs.get(msg.room)
            if req is not None and req.enc is enc and req.nonce == msg.nonce and not req.tracker.status.terminal:
                self._fail(req, f"cannot reach the encoder at {address}: {reason}", out, notify=False,
                           cause="unreachable", code=FailCode.UNREACHABLE)

    # ------------------------------------------------------------ failure
    def _fail(self, req: Req, reason: str, out: list, *, notify: bool, peer_dead: bool = False, hold: bool = False,
              cause: str = "error", code: FailCode, now: Optional[float] = None) -> None:
        """Mark Failed (``code``: why) and release blocks.  When the encoder
        may still write into the blocks (it was told to abort, not dead),
        they stay quarantined until it confirms; a dead peer or torn-down
        link releases them at once."""
        if not req.tracker.fail():
            return
        req.reason, req.cause, req.code = reason, cause, code
        copying = req.phase is Phase.COPYING
        self._set_phase(req, Phase.FAILED_COPYING if copying else Phase.FAILED)
        self.stats.request_failed(cause)
        if not copying:
            out.append(Discard(req))        # the merge buffer, if a copy made one
        enc = req.enc
        alive = enc.up and not peer_dead
        mode = "hold" if hold and alive else "quarantine" if notify and alive else "free"
        if copying:
            # the reader thread is copying out of these blocks: it releases them (copied())
            req.release = mode
        elif req.blocks or mode == "quarantine":
            # an ABORT goes out: the room stays quarantined (even without blocks)
            # until the encoder's acknowledgement, so a retry never meets it
            self._park(enc, req.room, req.blocks, mode, now)
            req.blocks = []
        if notify and alive:
            out.append(Send(enc.address, P.Abort(req.room, reason[:1000])))
        out.append(Notify(req))
        self._drain_waiting(out)

    def _park(self, enc: Enc, room, blocks: list, mode: str, now: Optional[float]) -> None:
        """Release a failed room's blocks: ``free`` now; ``quarantine`` until the
        encoder confirms our abort; ``hold`` until the link is torn down (a
        failed write into them may still land).  ``now`` None: the next tick
        starts the clock."""
        if mode == "free":
            if blocks:
                self.allocator.free(blocks, room)
        elif mode == "quarantine":
            enc.quarantine.setdefault(room, []).extend(blocks)
            enc.quarantined_at.setdefault(room, now)
        else:
            enc.held.setdefault(room, []).extend(blocks)
            enc.held_at.setdefault(room, now)

    def _release_quarantine(self, enc: Enc, room) -> None:
        blocks = enc.quarantine.pop(room, None)
        enc.quarantined_at.pop(room, None)
        if blocks:
            self.allocator.free(blocks, room)

    def _release_parked(self, enc: Enc) -> None:
        """The link to ``enc`` is gone: nothing can land in its parked blocks any more."""
        for room in list(enc.quarantine):
            self._release_quarantine(enc, room)
        for room, blocks in enc.held.items():
            self.allocator.free(blocks, room)
        enc.held.clear()
        enc.held_at.clear()

    # ------------------------------------------------------------ messages
    def _live(self, enc: Enc, room) -> Optional[Req]:
        """The live request for ``room`` that was asked of ``enc`` (another
        encoder's messages never touch it)."""
        req = self.reqs.get(room)
        if req is None or req.enc is not enc or req.tracker.status.terminal:
            return None
        return req

    def _on_status(self, ev: StatusReceived, out: list) -> None:
        """A STATUS from the encoder at ``address``."""
        address, msg, now = ev.address, ev.msg, ev.now
        enc = self.encs.get(address)
        if enc is None or not enc.up:
            return
        room = msg.room
        if room in enc.quarantine:
            # the encoder's answer to our abort (or its own failure of the
            # aborted attempt): nothing more will be written into those blocks
            if msg.status is Status.Failed:
                self._release_quarantine(enc, room)
                self._drain_waiting(out)
            return
        if msg.flags & P.FLAG_ABORT_ACK:
            return  # a late acknowledgement: it never fails a newer request for the room
        req = self._live(enc, room)
        if req is None:
            self.stats["late_status"] += 1
            return
        if msg.status is Status.Failed:
            # the encoder's code says why (decoded, so a known FailCode); one that named none is ERROR
            code = msg.code or FailCode.ERROR
            if msg.flags & P.FLAG_BLOCKS_UNSAFE:
                # a write into these blocks may still land: held until the link goes
                self.stats["unsafe_blocks"] += len(req.blocks)
                self._fail(req, f"encoder: {msg.reason or 'failed'}", out, notify=False, hold=True, cause="encoder",
                           code=code)
            else:
                self._fail(req, f"encoder: {msg.reason or 'failed'}", out, notify=False, cause="encoder", code=code)
            return
        if msg.status not in (Status.Transferring, Status.Success) or not req.blocks or req.phase is not Phase.ASKED:
            self._fail(req, f"unexpected status {msg.status.name} in state {req.tracker.status.name}", out,
                       notify=True, cause="bad_message", code=FailCode.BAD_MESSAGE)
            return
        try:
            self._check_chunk(req, msg, ev.aux, now, out)
        except (ValueError, ProtocolError, AllocatorError) as e:
            self._fail(req, f"bad chunk: {e}", out, notify=True, cause="bad_message", code=FailCode.BAD_MESSAGE)

    def _on_progress(self, ev: ProgressReceived, out: list) -> None:
        """Part of the current chunk landed: copy it out while the rest is written."""
        address, msg = ev.address, ev.msg
        enc = self.encs.get(address)
        if enc is None or not enc.up:
            return
        req = self._live(enc, msg.room)
        if req is None or msg.room in enc.quarantine:
            return
        try:
            if not req.blocks or req.phase is not Phase.ASKED or msg.seq != req.chunks + 1:
                raise ProtocolError("seq", f"progress for chunk {msg.seq} while expecting {req.chunks + 1}")
            bs = self.block_size
            self._ensure_total(req, 0, ev.aux)
            tokens = self._plan(req).tokens
            if msg.landed % bs or not req.landed < msg.landed < tokens:
                raise ProtocolError("landed", f"{msg.landed} tokens landed: must be whole blocks within "
                                              f"({req.landed}, {tokens})")
        except (ValueError, ProtocolError, AllocatorError) as e:
            self._fail(req, f"bad progress report: {e}", out, notify=True, cause="bad_message",
                       code=FailCode.BAD_MESSAGE)
            return
        if self._zero_copy_candidate(req, tokens):
            return  # the whole request arrives in this chunk: it will not be copied at all
        self._set_phase(req, Phase.COPYING)
        out.append(Copy(req, req.blocks[req.landed // bs:msg.landed // bs], msg.landed - req.landed, None))

    def _ensure_total(self, req: Req, status_total: int, read: Optional[tuple]) -> None:
        """On the first data of a request: take its aux (rule 3: only the first
        block of the first chunk carries it; ``read`` is the event's ``(total,
        aux record)``) and keep it for the whole request."""
        if req.aux is not None:
            return
        if read is None:
            raise ProtocolError("aux", "no aux record was read for the first chunk")
        total, aux = read
        if not 0 < total <= MAX_REQUEST_TOKENS:
            raise ProtocolError("aux", f"total token count {total} is outside [1, {MAX_REQUEST_TOKENS}]")
        if status_total and status_total != total:
            raise ProtocolError("total_tokens", f"status says {status_total}, aux says {total}")
        req.total_tokens = total
        req.aux = aux

    def _plan(self, req: Req):
        """The chunk the encoder sends into ``req.blocks`` (:func:`~embresume.planner.plan_chunk`)."""
        return plan_chunk(req.total_tokens, req.sent_tokens, self.allocator.allocated_tokens(req.blocks),
                          self.block_size, req.blocks)

    def _zero_copy_candidate(self, req: Req, tokens: int) -> bool:
        """The request completes in its first chunk, in consecutive blocks."""
        if not self.zero_copy or req.chunks or req.landed or tokens != req.total_tokens:
            return False
        need = -(-tokens // self.block_size)
        b0 = req.blocks[0]
        return req.blocks[:need] == list(range(b0, b0 + need))

    def _check_chunk(self, req: Req, msg: P.StatusMsg, aux: Optional[tuple], now: float, out: list) -> None:
        """Validate a chunk's STATUS; queue its copy (or its zero-copy success)."""
        if msg.seq != req.chunks + 1:
            raise ProtocolError("seq", f"expected chunk {req.chunks + 1}, got {msg.seq}")
        self._ensure_total(req, msg.total_tokens, aux)
        if msg.total_tokens and msg.total_tokens != req.total_tokens:
            raise ProtocolError("total_tokens", f"status says {msg.total_tokens}, aux said {req.total_tokens}")
        plan = self._plan(req)          # the encoder's decision, recomputed by the same function
        tokens, complete = plan.tokens, not plan.partial
        if msg.chunk_tokens != tokens:
            raise ProtocolError("chunk_tokens", f"expected {tokens}, got {msg.chunk_tokens}")
        if (msg.status is Status.Success) != complete:
            raise ProtocolError("status", f"{msg.status.name} with {req.total_tokens - req.sent_tokens - tokens} "
                                          "tokens left")
        if msg.sent_tokens != req.sent_tokens + tokens:
            raise ProtocolError("sent_tokens", f"expected {req.sent_tokens + tokens}, got {msg.sent_tokens}")
        if complete and self._zero_copy_candidate(req, tokens):
            self._zero_copy(req, tokens, now, out)
            return
        self._set_phase(req, Phase.COPYING)
        bs = self.block_size
        out.append(Copy(req, req.blocks[req.landed // bs:], tokens - req.landed, (tokens, complete)))

    def _zero_copy(self, req: Req, tokens: int, now: float, out: list) -> None:
        """Single-chunk request in consecutive blocks: the result is a view of
        the pool; the blocks move to a lease until the result is released."""
        need = -(-tokens // self.block_size)
        spare = req.blocks[need:]
        wasted = self.allocator.allocated_tokens(req.blocks) - tokens
        if spare:
            self.allocator.free(spare, req.room)
        blocks, req.blocks = req.blocks[:need], []
        self._lease_ids += 1
        self.leases[self._lease_ids] = (req.room, blocks)
        req.chunks = 1
        req.sent_tokens = tokens
        self.stats["zero_copy"] += 1
        out.append(ZeroCopy(req, blocks, tokens, self._lease_ids))
        self._succeed(req, tokens, wasted, now, out)

    def _succeed(self, req: Req, last_tokens: int, wasted: int, now: float, out: list) -> None:
        self._set_phase(req, Phase.SUCCEEDED)
        req.tracker.set(Status.Success)
        self.stats.chunk(last_tokens, self.row_bytes)
        self.stats.request_succeeded(resumes=req.chunks - 1, latency_s=now - req.t0, wasted_tokens=wasted)
        self.stats.pool(self.allocator.used_blocks)
        out.append(Notify(req))
        self._drain_waiting(out)

    def _on_forget(self, ev: Forget, out: list) -> None:
        """A failed request leaves the table uncollected (nothing else does)."""
        req = self.reqs.get(ev.room)
        if req is not None and req.tracker.status is Status.Failed:
            del self.reqs[ev.room]

    def _on_lease_returned(self, ev: LeaseReturned, out: list) -> None:
        """A zero-copy result was released: its blocks go back to the allocator."""
        lease = ev.lease
        entry = self.leases.pop(lease, None)
        if entry is not None:
            self.allocator.free(entry[1], entry[0])
            self._drain_waiting(out)

    def _on_copied(self, ev: Copied, out: list) -> None:
        """A :class:`Copy` finished (``error``: why it failed)."""
        req, tokens, end, error, now = ev.req, ev.tokens, ev.end, ev.error, ev.now
        if req.phase is Phase.FAILED_COPYING:
            # failed (abort, timeout, peer loss) while we copied: release now
            self._set_phase(req, Phase.FAILED)
            out.append(Discard(req))
            blocks, req.blocks = req.blocks, []
            mode = req.release if req.enc.up else "free"
            if blocks or mode == "quarantine":
                self._park(req.enc, req.room, blocks, mode, now)
                self._drain_waiting(out)
            return
        if error is not None or end is None:
            self._set_phase(req, Phase.ASKED)       # the copy is over; the blocks are still the request's
        if error is not None:
            self._fail(req, f"copying the chunk failed: {error}", out, notify=True, cause="copy",
                       code=FailCode.COPY_FAILED, now=now)
            return
        req.landed += tokens
        if end is not None:
            req.landed = 0
            self._chunk_done(req, *end, now, out)

    def _chunk_done(self, req: Req, tokens: int, complete: bool, now: float, out: list) -> None:
        wasted = self.allocator.allocated_tokens(req.blocks) - tokens if complete else 0
        self.allocator.free(req.blocks, req.room)
        req.blocks = []
        req.sent_tokens += tokens
        req.chunks += 1
        req.deadline = now + self.request_timeout
        if complete:
            out.append(Complete(req))
            self._succeed(req, tokens, wasted, now, out)
            return
        self.stats.chunk(tokens, self.row_bytes)
        req.tracker.set(Status.Transferring)
        self._set_phase(req, Phase.WAITING_BLOCKS)      # the rest needs blocks
        # free first, then allocate the rest: a resume can always reuse its own
        # blocks, and it never queues behind new requests (with TP ranks that
        # would let two ranks wait on each other through the encoder's gate)
        if not self._try_allocate(req, out, req.total_tokens - req.sent_tokens):
            self._waiting.append(req.room)
            self._drain_waiting(out)

    # ------------------------------------------------------------ liveness
    def _on_link_lost(self, ev: LinkLost, out: list) -> None:
        """The link to ``address`` is gone: fail its rooms, free what was parked for it."""
        address, reason = ev.address, ev.reason
        enc = self.encs.get(address)
        if enc is None:
            return
        enc.up, enc.session = False, ""
        # every room of this encoder fails with the reason, and only then are the
        # freed blocks given to waiting requests (a waiting request of this
        # encoder must not first be admitted and fail as 'unreachable')
        self._drain_held = True
        try:
            self._release_parked(enc)
            for req in list(self.reqs.values()):
                if req.enc is enc and not req.tracker.status.terminal:
                    self._fail(req, f"encoder lost ({address}): {reason}", out, notify=False, peer_dead=True,
                               cause="peer_lost", code=FailCode.PEER_LOST)
        finally:
            self._drain_held = False
        self._drain_waiting(out)

    def _on_tick(self, ev: Tick, out: list) -> None:
        """The clock: requests past their deadline fail (and are aborted); an
        encoder that left an abort unanswered, or blocks held, longer than the
        quarantine timeout is torn down."""
        now = ev.now
        for req in list(self.reqs.values()):
            if not req.tracker.status.terminal and now > req.deadline:
                st = req.tracker.status
                reason = f"timed out in {st.name} after {self.request_timeout}s without progress"
                if req.required_dst_info_num > 1 and st is Status.WaitingForInput:
                    reason += (f" (required_dst_info_num={req.required_dst_info_num}: the encoder starts only "
                               f"when all {req.required_dst_info_num} tensor-parallel ranks requested the room)")
                elif st is Status.WaitingForInput:
                    reason += " (the encoder never sent this room)"
                self._fail(req, reason, out, notify=True, cause="timeout", code=FailCode.TIMEOUT, now=now)
        limit = self.quarantine_timeout
        for enc in self.encs.values():
            if not enc.up:
                continue
            for since, counter, why in (
                    (enc.quarantined_at, "stuck_encoders",
                     "stuck: no acknowledgement of the abort of room {room!r} within {limit:.1f}s (its blocks were "
                     "quarantined; the connection is torn down to free them)"),
                    (enc.held_at, "held_teardowns",
                     "blocks of room {room!r} held for {limit:.1f}s after a failed write into them (the connection "
                     "is torn down so that nothing can land in them any more, and they are freed)")):
                room = self._overdue(since, now, limit)
                if room is not None:
                    self.stats[counter] += 1
                    out.append(TearDown(enc.address, why.format(room=room, limit=limit)))
                    break

    @staticmethod
    def _overdue(since: dict, now: float, limit: float):
        for room, t in since.items():
            if t is None:
                since[room] = now       # parked without a clock (a message, not a tick): starts now
            elif now - t > limit:
                return room
        return None

    def _on_close(self, ev: Close, out: list) -> None:
        """The endpoint closes: every live request fails, everything parked is freed."""
        self.closed = True
        for req in list(self.reqs.values()):
            if not req.tracker.status.terminal:
                self._fail(req, "endpoint closed", out, notify=False, peer_dead=True, cause="closed",
                           code=FailCode.CLOSED)
        for enc in self.encs.values():
            enc.up = False
            self._release_parked(enc)

    _HANDLERS: dict = {}            # event type -> handler, filled in below the class

    # ------------------------------------------------------------ the ledger
    def ledger(self) -> dict:
        """Every block's owner: ``{"free": [...], "request": {room: [...]},
        "quarantine": {(address, room): [...]}, "held": {...}, "lease": {id: [...]}}``.
        A request that is copying owns its blocks until :meth:`copied`."""
        return {"free": list(self.allocator._free),
                "request": {r.room: list(r.blocks) for r in self.reqs.values() if r.blocks},
                "quarantine": {(e.address, room): list(b) for e in self.encs.values()
                               for room, b in e.quarantine.items() if b},
                "held": {(e.address, room): list(b) for e in self.encs.values() for room, b in e.held.items() if b},
                "lease": {k: list(v[1]) for k, v in self.leases.items()}}

    def check_ledger(self) -> None:
        """Raise AssertionError unless every block has exactly one owner."""
        led = self.ledger()
        owned = list(led["free"])
        for kind in ("request", "quarantine", "held", "lease"):
            for blocks in led[kind].values():
                owned.extend(blocks)
        if sorted(owned) != list(range(self.num_blocks)):
            dup = sorted(b for b, n in collections.Counter(owned).items() if n > 1)
            lost = sorted(set(range(self.num_blocks)) - set(owned))
            raise AssertionError(f"block ledger broken: owned twice {dup[:20]}, owned by nobody {lost[:20]}")


LanguageRooms._HANDLERS = {
    RequestRoom: LanguageRooms._on_request, LinkUp: LanguageRooms._on_connected,
    LinkFailed: LanguageRooms._on_connect_failed, StatusReceived: LanguageRooms._on_status,
    ProgressReceived: LanguageRooms._on_progress, Copied: LanguageRooms._on_copied,
    SendFailed: LanguageRooms._on_send_failed, AbortRoom: LanguageRooms._on_abort, Tick: LanguageRooms._on_tick,
    LinkLost: LanguageRooms._on_link_lost, Close: LanguageRooms._on_close,
    LeaseReturned: LanguageRooms._on_lease_returned, Forget: LanguageRooms._on_forget,
}
