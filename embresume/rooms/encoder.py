"""The encoder side's rooms: registered embeddings, the ranks' requests, rounds, bounds and timeouts, with no I/O.

:class:`EncoderRooms` holds every room of one
:class:`~embresume.encoder.EncoderEndpoint`: the embedding registered for
it (its *source*), the ranks (language sessions) that asked for it and how
far each one is.  The endpoint feeds it events through one entry,
:meth:`EncoderRooms.handle` (an event dataclass in, the list of actions out;
the method of each event's name is a thin wrapper of it), and carries out
the actions it returns, in order::

    event (handle(...) / method)                   actions it may return
    -------------------------------------------    ----------------------------------------
    Register / register(room, source, now, ...)    Write, Send (Failed), Done
    Withdraw / withdraw(room)                      Done
    Expect / expect(room)                          (none: forgets that the room was let go of)
    InitReceived / init(session, INIT, now)        Write, Reject, Send (Failed), Done
    ResumeReceived / resume(session, RESUME, now)  Write, Reject, Send (Failed), Done
    AbortReceived / abort(session, ABORT)          Send (Failed, FLAG_ABORT_ACK), Done
    Written / written(room, rank, plan, now)       SendAfterWrite (its STATUS, or the Failed deferred
                                                   while it was in flight), Write (next round), Send, Done
    WriteFailed / write_failed(room, rank, reason) SendAfterWrite (Failed, FLAG_BLOCKS_UNSAFE), Send, Done
    WriteSkipped / write_skipped(room, rank)       SendAfterWrite (a Failed deferred while it was in flight)
    LinkLost / peer_lost(session, reason),         Send (Failed), Done
    Tick / tick(now), Close / close

:class:`Send` means what it means on the language side: the message goes on
the session's link now, under the lock.  The endpoint runs every action
under its lock except :class:`SendAfterWrite`, which the thread that did the
write sends once the lock is released (a STATUS goes out only after its
chunk landed, and a rank's Failed only after its in-flight write is over:
rule 7 of docs/design.md).  A :class:`Write` is carried out outside the lock
too (on the rank's worker or reader thread, or the thread of ``send`` for a
small first chunk); the rank is in phase ``WRITING`` until the endpoint
reports :class:`Written`, :class:`WriteFailed` or :class:`WriteSkipped`.

Each rank has one :class:`Phase`, changed only by
:meth:`EncoderRooms._set_phase` and only along :data:`TRANSITIONS` (a change
the table lacks raises :class:`~embresume.rooms.PhaseError`).

The rules of docs/design.md section 4 live here: a room keeps its source
until it ends (1), ``allocated_tokens == len(dst_blocks) * block_size`` (2),
aux goes with a rank's first chunk only (3: ``Write.first``), duplicate and
replayed INITs are ignored while a new nonce is a new use of the key (4), a
round starts when every rank still receiving asked for it (5), every index a
peer sends is checked (6).  So do the per-session bounds of section 8 (live
rooms and unanswered destination blocks of each :class:`Session`) and the
rule that a room's ranks all belong to the TP group of its first INIT.

Every Failed STATUS it posts carries a :class:`~embresume.errors.FailCode`
(``code``) saying why; the ``reason`` text beside it is for people.  The
machine remembers the last :data:`NOT_PUBLISHED_MEMORY` rooms whose
embedding it let go of (withdrawn, or timed out while registered): an INIT
or RESUME for one of them is answered at once with Failed, code
NOT_PUBLISHED, instead of waiting as an empty room for an embedding that is
gone, until the room is registered again (or announced: :meth:`EncoderRooms.expect`).

Counts are kept as data in the machine's :class:`~embresume.rooms.Tally`
(``stats``), which the endpoint records into its
:class:`~embresume.metrics.EndpointStats` after each event.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, replace
from typing import Callable, Optional

from .. import protocol as P
from ..errors import BlockSizeMismatch, FailCode, InvalidArgument, ProtocolError
from ..metrics import EndpointStats
from ..planner import ChunkPlan, check_block_size, plan_chunk
from ..status import Status, StatusTracker
from . import Tally, check_phase

#: finished rooms (their final status, for wait/poll) and finished INITs
#: (session, room, nonce: a replay is a duplicate) remembered
FINISHED_MEMORY = 65536
#: per language session (one rank's connection): rooms it is a rank of, and
#: destination blocks it has asked to be written and not yet been answered
#: for (at most its pool's blocks: an honest rank cannot have more).  An INIT
#: past either bound is refused to that rank alone (STATUS Failed).
MAX_LIVE_ROOMS_PER_SESSION = 16384
MAX_LIVE_BLOCKS_PER_SESSION = 1 << 20
#: rooms whose registered embedding the machine let go of (withdrawn, or timed
#: out) remembered, the oldest forgotten first: an INIT or RESUME for one is
#: answered at once with Failed + NOT_PUBLISHED (one entry per room; only the
#: application's registrations add entries, never a peer)
NOT_PUBLISHED_MEMORY = 65536

_TERMINAL = (Status.Success, Status.Failed)
_SUCCESS, _FAILED, _TRANSFERRING = Status.Success, Status.Failed, Status.Transferring


# ---------------------------------------------------------------- phases
class Phase(enum.Enum):
    """Where one rank (one session's part in a room) is (``Rank.phase``).
    Only :meth:`EncoderRooms._set_phase` changes it, and only along
    :data:`TRANSITIONS`; the room's public :class:`~embresume.status.Status`
    (``Room.tracker``) has its own table."""
    ASKED = "asked"             # asked for its next chunk (INIT / RESUME): waits for the round (rule 5)
    WRITING = "writing"         # a Write into its blocks is out (its blocks are counted until it is over)
    SENT = "sent"               # its chunk landed and its STATUS went out: waits for its RESUME
    DONE = "done"               # it has all its tokens
    UNSAFE = "unsafe"           # its write failed and may still land: its Failed says so once the write is over
    FAILED = "failed"           # terminal: its room failed; it was told (or its session is gone)


_P = Phase
#: every phase change a rank may make, and what makes it (docs/design.md,
#: "Room state machines" draws it); anything else raises PhaseError
TRANSITIONS: dict[Phase, dict[Phase, str]] = {
    _P.ASKED: {
        _P.WRITING: "the round starts (every rank still receiving asked): Write",
        _P.FAILED: "its room fails (abort, bad message, timeout, peer lost, close): Send(Failed)",
    },
    _P.WRITING: {
        _P.SENT: "written, the request has more: SendAfterWrite(STATUS Transferring)",
        _P.DONE: "written, its last chunk: SendAfterWrite(STATUS Success)",
        _P.UNSAFE: "write_failed",
        _P.FAILED: "written / write_skipped after its room failed: SendAfterWrite(the deferred Failed)",
    },
    _P.SENT: {
        _P.ASKED: "resume",
        _P.FAILED: "its room fails: Send(Failed)",
    },
    _P.DONE: {
        _P.FAILED: "its room fails (another rank's doing): Send(Failed)",
    },
    _P.UNSAFE: {
        _P.FAILED: "write_failed, once its room failed: SendAfterWrite(Failed, FLAG_BLOCKS_UNSAFE)",
    },
    _P.FAILED: {},
}
_IN_FLIGHT = (_P.WRITING, _P.UNSAFE)


# ---------------------------------------------------------------- events
# what the endpoint feeds EncoderRooms.handle() (or the method of the same
# name, a thin wrapper); ``now`` is the endpoint's monotonic clock
@dataclass(slots=True)
class Register:
    """The application registers an embedding for ``room`` (send / send_tensors)."""
    room: P.Room
    source: object
    now: float
    on_done: Optional[Callable] = None
    own_blocks: Optional[list] = None


@dataclass(slots=True)
class Withdraw:
    """The application takes back a registered embedding no rank asked for yet."""
    room: P.Room


@dataclass(slots=True)
class Expect:
    """The application is about to register ``room`` (from another thread)."""
    room: P.Room


@dataclass(slots=True)
class InitReceived:
    """A decoded INIT from ``session``."""
    session: "Session"
    msg: P.Init
    now: float


@dataclass(slots=True)
class ResumeReceived:
    """A decoded RESUME from ``session``."""
    session: "Session"
    msg: P.Resume
    now: float


@dataclass(slots=True)
class AbortReceived:
    """A decoded ABORT from ``session``."""
    session: "Session"
    msg: P.Abort


@dataclass(slots=True)
class Written:
    """A :class:`Write` landed: ``plan`` of ``room`` is in ``rank``'s blocks."""
    room: "Room"
    rank: "Rank"
    plan: ChunkPlan
    now: float


@dataclass(slots=True)
class WriteFailed:
    """A :class:`Write` failed (it may still land)."""
    room: "Room"
    rank: "Rank"
    reason: str


@dataclass(slots=True)
class WriteSkipped:
    """A :class:`Write` was not started, or cut short: its room was terminal."""
    room: "Room"
    rank: "Rank"


@dataclass(slots=True)
class LinkLost:
    """``session``'s link is gone (the language side's event of the same name names an address)."""
    session: "Session"
    reason: str


@dataclass(slots=True)
class Tick:
    """The clock."""
    now: float


@dataclass(slots=True)
class Close:
    """The endpoint closes."""


# ---------------------------------------------------------------- actions
@dataclass(slots=True)
class Write:
    """Write ``plan`` of ``source`` (``room``'s) into ``rank``'s blocks (with
    the aux record when ``first``), outside the lock; then report
    :meth:`EncoderRooms.written` (or ``write_failed`` / ``write_skipped``).

    What the writing thread reads, without the lock, is in here as data:
    ``seq`` (the chunk's number, for its PROGRESS reports) and ``ended``
    (the room's :class:`Ended`, set by the machine when the room ends: the
    write is skipped or cut short then).  ``room`` and ``rank`` are handed
    back in the report, not read."""
    room: "Room"
    rank: "Rank"
    plan: ChunkPlan
    first: bool
    source: object
    seq: int = 1
    ended: Optional["Ended"] = None


@dataclass(slots=True)
class Send:
    """Send ``msg`` to ``session`` now, under the lock (it goes into the
    session's link, behind that session's in-flight writes), as the language
    side's :class:`~embresume.rooms.language.Send` does."""
    session: "Session"
    msg: P.StatusMsg


@dataclass(slots=True)
class SendAfterWrite(Send):
    """Send ``msg`` to ``session`` from the thread that did the write, once
    the lock is released: a chunk's STATUS (only after its chunk landed), or
    the Failed of a rank whose write is over (rule 7)."""



@dataclass(slots=True)
class Reject:
    """``session`` sent something refused for ``room`` (counted in
    ``stats["rejected"]``): log it, and post ``msg`` (a Failed to that session
    alone) unless None (the room itself failed: its ranks are told by Posts)."""
    session: "Session"
    room: P.Room
    reason: str
    msg: Optional[P.StatusMsg]
    code: FailCode = FailCode.ERROR


@dataclass(slots=True)
class Done:
    """``room`` is terminal and left the table: wake its waiters, free its own
    blocks, call its ``on_done`` (a failure with a ``cause`` is logged)."""
    room: "Room"


# ---------------------------------------------------------------- state
class Session:
    """One language rank's connection as the machine sees it: its TP group,
    its pool's layout (a :class:`~embresume.blocks.BlockLayout`) and its live
    counts.  ``peer`` is the endpoint's object for it (opaque here)."""

    __slots__ = ("id", "tp_rank", "group", "layout", "row_bytes", "live_rooms", "live_blocks", "alive", "peer")

    def __init__(self, session_id: str, group: str, layout, peer=None, tp_rank: int = 0):
        self.id = session_id
        self.tp_rank = tp_rank
        self.group = group
        self.layout = layout
        self.row_bytes = layout.emb_row_bytes
        #: live rooms it is a rank of, blocks of its pool it asked for and awaits
        self.live_rooms = 0
        self.live_blocks = 0
        self.alive = True
        self.peer = peer

    def __repr__(self) -> str:
        return f"Session({self.id!r})"


class Rank:
    """One session's part in a room."""

    __slots__ = ("session", "nonce", "dst_blocks", "allocated_tokens", "sent_tokens", "chunks", "phase",
                 "failed_msg", "counted")

    def __init__(self, session: Session, nonce: int, dst_blocks: tuple, allocated_tokens: int):
        self.session = session
        self.nonce = nonce
        self.dst_blocks = dst_blocks
        self.allocated_tokens = allocated_tokens
        self.sent_tokens = 0
        self.chunks = 0
        self.phase = Phase.ASKED
        self.failed_msg: Optional[P.StatusMsg] = None   # sent once its in-flight write is over
        self.counted = 0            # dst blocks counted in session.live_blocks (asked for, not yet answered)

    @property
    def peer(self):
        return self.session.peer

    @property
    def pending(self) -> bool:
        """Asked for its next chunk."""
        return self.phase is Phase.ASKED

    @property
    def in_flight(self) -> bool:
        """A Write of it is out."""
        return self.phase in _IN_FLIGHT

    @property
    def done(self) -> bool:
        """It has all its tokens."""
        return self.phase is Phase.DONE

    @property
    def unsafe(self) -> bool:
        """A write into its blocks failed and may still land."""
        return self.phase is Phase.UNSAFE

    def __repr__(self) -> str:
        return f"Rank({self.session.id!r}, {self.phase.name})"


class Ended:
    """Whether a room ended (Success or Failed), published to the threads that
    write it outside the lock (:attr:`Write.ended`).  Only the machine sets it,
    under the lock, when the room leaves the table; a writer reads ``set``."""

    __slots__ = ("set",)

    def __init__(self) -> None:
        self.set = False


class Room:
    """One room: its source (once registered), its ranks by session id."""

    __slots__ = ("room", "deadline", "tracker", "source", "required", "ranks", "on_done", "own_blocks",
                 "reason", "cause", "code", "t0", "group", "ended")

    def __init__(self, room: P.Room, now: float, deadline: float):
        self.room = room
        self.deadline = deadline
        self.tracker = StatusTracker()
        self.source = None
        self.required = 0
        self.ranks: dict[str, Rank] = {}
        self.on_done: Optional[Callable] = None
        self.own_blocks: Optional[list] = None
        self.reason = ""
        self.cause = ""
        self.code = FailCode.NONE            # why it failed (the code its ranks were told)
        self.t0 = now
        self.group: Optional[str] = None     # the TP group of its ranks (set by the first INIT)
        self.ended = Ended()                 # set when it ends (read by its writers, outside the lock)

    @property
    def status(self) -> Status:
        return self.tracker.status


class EncoderRooms:
    """The encoder side's room state machine (see the module docstring).

    Sources are duck-typed: ``total_tokens``, ``hidden``, ``dtype`` and
    ``mrope_delta`` are read, nothing else.  ``stats`` (``machine.stats``) is
    a :class:`~embresume.rooms.Tally`: the machine's counts as data, which the
    endpoint records into its :class:`~embresume.metrics.EndpointStats`
    (``stats=``, bound here) after each event."""

    def __init__(self, *, stats: Optional[EndpointStats] = None, request_timeout: float = 60.0):
        #: the machine's counts, recorded by the endpoint outside its events
        self.stats = Tally(stats)
        self.request_timeout = request_timeout
        self.rooms: dict[P.Room, Room] = {}
        #: final statuses of finished rooms (for wait / poll)
        self.finished: "collections.OrderedDict[P.Room, Status]" = collections.OrderedDict()
        #: (session, room, nonce) of INITs whose room finished: a replay is a duplicate
        self.finished_inits: "collections.OrderedDict[tuple, None]" = collections.OrderedDict()
        #: (session id, room) -> the rank whose write was still out when its room
        #: ended (its Failed waits for the write); an ABORT for such a room is
        #: answered by that Failed, never ahead of the write (at most one entry
        #: per in-flight write)
        self.orphans: dict[tuple, Rank] = {}
        #: rooms whose registered embedding was let go of (withdrawn, timed
        #: out), at most NOT_PUBLISHED_MEMORY: INIT / RESUME answered NOT_PUBLISHED
        self.let_go: "collections.OrderedDict[P.Room, None]" = collections.OrderedDict()

    @staticmethod
    def _set_phase(k: Rank, new: Phase) -> None:
        """The one place a rank's phase changes: along :data:`TRANSITIONS` only."""
        check_phase(TRANSITIONS, "rank", k.phase, new)
        k.phase = new

    # ------------------------------------------------------------ events
    def handle(self, ev) -> list:
        """The one entry: feed one event (a dataclass of this module's
        events), get the actions to carry out, in order.  A registration that
        is refused raises InvalidArgument and changes nothing."""
        out: list = []
        try:
            on = self._HANDLERS[type(ev)]
        except KeyError:
            raise TypeError(f"not an event of the encoder machine: {ev!r}") from None
        on(self, ev, out)
        return out

    # the per-event methods: thin wrappers of handle() for the endpoint and the tests
    def register(self, room: P.Room, source, now: float, on_done: Optional[Callable] = None,
                 own_blocks: Optional[list] = None) -> list:
        return self.handle(Register(room, source, now, on_done, own_blocks))

    def withdraw(self, room: P.Room) -> Optional[list]:
        r = self.rooms.get(room)
        if r is None or r.source is None or r.ranks:
            return None                     # nothing changes: a room unknown, finished or asked for
        return self.handle(Withdraw(room))

    def expect(self, room: P.Room) -> None:
        self.handle(Expect(room))

    def init(self, s: Session, msg: P.Init, now: float) -> list:
        return self.handle(InitReceived(s, msg, now))

    def resume(self, s: Session, msg: P.Resume, now: float) -> list:
        return self.handle(ResumeReceived(s, msg, now))

    def abort(self, s: Session, msg: P.Abort) -> list:
        return self.handle(AbortReceived(s, msg))

    def written(self, r: Room, k: Rank, plan: ChunkPlan, now: float) -> list:
        return self.handle(Written(r, k, plan, now))

    def write_failed(self, r: Room, k: Rank, reason: str) -> list:
        return self.handle(WriteFailed(r, k, reason))

    def write_skipped(self, r: Room, k: Rank) -> list:
        return self.handle(WriteSkipped(r, k))

    def peer_lost(self, s: Session, reason: str) -> list:
        return self.handle(LinkLost(s, reason))

    def tick(self, now: float) -> list:
        return self.handle(Tick(now))

    def close(self) -> list:
        return self.handle(Close())

    # ------------------------------------------------------------ the application
    def _on_register(self, ev: Register, out: list) -> None:
        """An embedding for ``room`` (send / send_tensors).  Raises
        InvalidArgument, changing nothing, when one is already in flight."""
        room, source, now, on_done, own_blocks = ev.room, ev.source, ev.now, ev.on_done, ev.own_blocks
        r = self.rooms.get(room)
        if r is None:
            r = self.rooms[room] = Room(room, now, now + self.request_timeout)
            self.finished.pop(room, None)
        elif r.source is not None:
            raise InvalidArgument(f"room {room!r} already has an embedding in flight")
        self.let_go.pop(room, None)          # published again
        r.source, r.on_done, r.own_blocks = source, on_done, own_blocks
        r.deadline = now + self.request_timeout
        r.t0 = now
        self.stats["sends"] += 1
        self.stats.request_started()
        self._maybe_start(r, out)

    def _on_withdraw(self, ev: Withdraw, out: list) -> None:
        """Take back a registered embedding no rank asked for yet (no action
        for a room unknown, finished or asked for: :meth:`withdraw` answers None)."""
        room = ev.room
        r = self.rooms.get(room)
        if r is None or r.source is None or r.ranks:
            return
        r.reason = "withdrawn by the encoder"
        r.code = FailCode.NOT_PUBLISHED
        r.tracker.fail()
        self._let_go(room)
        self._finish(r, out)

    def _on_expect(self, ev: Expect, out: list) -> None:
        """An embedding for ``room`` is about to be registered (by another
        thread of the application): forget that it was let go of, so that an
        INIT arriving before the registration waits for it (rule 4's either
        order) instead of being answered NOT_PUBLISHED."""
        room = ev.room
        self.let_go.pop(room, None)

    def _let_go(self, room: P.Room) -> None:
        self.let_go[room] = None
        self.let_go.move_to_end(room)
        while len(self.let_go) > NOT_PUBLISHED_MEMORY:
            self.let_go.popitem(last=False)

    # ------------------------------------------------------------ the ranks
    def _on_init(self, ev: InitReceived, out: list) -> None:
        s, msg, now = ev.session, ev.msg, ev.now
        r = self.rooms.get(msg.room)
        if r is None and (s.id, msg.room, msg.nonce) in self.finished_inits:
            self.stats["duplicates"] += 1  # rule 4: a replay of an INIT whose room finished
            return
        if r is None and msg.room in self.let_go:
            # its embedding was withdrawn or timed out: it will not come (unless
            # registered again), so the rank is told now instead of waiting
            self.stats["not_published"] += 1
            self._reject(s, msg.room, "not published: the encoder let go of this room's embedding (withdrawn, "
                                      "or nobody asked for it within request_timeout)", out, FailCode.NOT_PUBLISHED)
            return
        if r is not None:
            k = r.ranks.get(s.id)
            if k is not None:
                if k.nonce == msg.nonce:
                    self.stats["duplicates"] += 1  # rule 4
                    return
                self._reject(s, msg.room, "a new request for a room this rank is still receiving", out,
                             FailCode.BAD_REQUEST)
                return
            if r.ranks and r.group != s.group:
                # the room belongs to the TP group of its first rank: another
                # group is told, whatever it claims, and the room is left alone
                self.stats["other_group"] += 1
                self._reject(s, msg.room, "the room belongs to another TP group (another engine instance's "
                                          "ranks asked for it first)", out, FailCode.TP_GROUP)
                return
            if r.tracker.status in (Status.Transferring, Status.Success):
                self._reject(s, msg.room, f"room already {r.tracker.status.name} to its {r.required} rank(s)", out,
                             FailCode.BUSY)
                return
        try:
            self._validate_dst(s, msg)
        except (ProtocolError, BlockSizeMismatch) as e:
            self._reject(s, msg.room, str(e), out, FailCode.BAD_REQUEST)
            return
        bound = min(s.layout.num_blocks, MAX_LIVE_BLOCKS_PER_SESSION)
        if s.live_rooms >= MAX_LIVE_ROOMS_PER_SESSION or s.live_blocks + len(msg.dst_blocks) > bound:
            self.stats["refused_bound"] += 1
            self._reject(s, msg.room, f"this rank already has {s.live_rooms} rooms and {s.live_blocks} "
                                      f"blocks in flight (bounds: {MAX_LIVE_ROOMS_PER_SESSION} rooms, {bound} "
                                      "blocks)", out, FailCode.BOUND)
            return
        if r is None:
            r = self.rooms[msg.room] = Room(msg.room, now, now + self.request_timeout)
            self.finished.pop(msg.room, None)
        if r.required and len(r.ranks) >= r.required:
            # the room's ranks are complete: another session is told, the room is left alone
            self._reject(s, msg.room, f"more than required_dst_info_num={r.required} ranks", out, FailCode.BUSY)
            return
        if r.required and r.required != msg.required_dst_info_num:
            # still gathering its ranks: they disagree, so every one of them is told now
            reason = f"ranks disagree on required_dst_info_num ({r.required} vs {msg.required_dst_info_num})"
            self._reject(s, msg.room, reason, out, FailCode.RANKS_DISAGREE)
            self._fail(r, reason, out, code=FailCode.RANKS_DISAGREE)
            return
        r.required = msg.required_dst_info_num
        r.group = s.group
        k = r.ranks[s.id] = Rank(s, msg.nonce, msg.dst_blocks, msg.allocated_tokens)
        s.live_rooms += 1
        self._count(k)
        r.deadline = now + self.request_timeout
        if len(r.ranks) == r.required and r.tracker.status is Status.Bootstrapping:
            r.tracker.set(Status.WaitingForInput)
        self._maybe_start(r, out)

    def _on_resume(self, ev: ResumeReceived, out: list) -> None:
        s, msg, now = ev.session, ev.msg, ev.now
        r = self.rooms.get(msg.room)
        k = r.ranks.get(s.id) if r is not None else None
        if k is None or r.source is None or k.nonce != msg.nonce:
            if r is None and msg.room in self.let_go:
                self.stats["not_published"] += 1
                self._reject(s, msg.room, "resume for a room this encoder does not hold: not published (the "
                                          "encoder let go of its embedding)", out, FailCode.NOT_PUBLISHED)
            else:
                self._reject(s, msg.room, "resume for a room this encoder does not hold", out, FailCode.BAD_REQUEST)
            return
        try:
            self._validate_dst(s, msg)
        except (ProtocolError, BlockSizeMismatch) as e:
            self._fail(r, str(e), out, cause="bad_message", code=FailCode.BAD_REQUEST)
            return
        if k.done or k.pending or k.in_flight:
            self.stats["duplicates"] += 1
            return
        if msg.sent_tokens != k.sent_tokens:
            self._fail(r, f"resume with sent_tokens={msg.sent_tokens}, encoder sent {k.sent_tokens}", out,
                       cause="bad_message", code=FailCode.BAD_REQUEST)
            return
        k.dst_blocks, k.allocated_tokens = msg.dst_blocks, msg.allocated_tokens
        self._set_phase(k, Phase.ASKED)
        self._count(k)
        r.deadline = now + self.request_timeout
        self._maybe_start(r, out)

    def _on_abort(self, ev: AbortReceived, out: list) -> None:
        s, msg = ev.session, ev.msg
        r = self.rooms.get(msg.room)
        k = self.orphans.get((s.id, msg.room))
        if r is not None and s.id in r.ranks:
            self._fail(r, f"aborted by rank {s.tp_rank}: {msg.reason}", out, ack=s, cause="aborted",
                       code=FailCode.ABORTED)
        elif k is not None and k.failed_msg is not None:
            # the room ended while a write into this rank's blocks is still out:
            # its Failed, sent once the write is over, is the acknowledgement
            m = k.failed_msg
            k.failed_msg = replace(m, flags=m.flags | P.FLAG_ABORT_ACK)
        else:
            # nothing of ours in flight: confirm at once so the rank frees its blocks
            out.append(Send(s, P.StatusMsg(msg.room, Status.Failed, reason="abort confirmed",
                                           flags=P.FLAG_ABORT_ACK, code=FailCode.ABORTED)))

    # ------------------------------------------------------------ writes
    def _on_written(self, ev: Written, out: list) -> None:
        """``plan`` of ``r`` landed in ``k``'s blocks."""
        r, k, plan, now = ev.room, ev.rank, ev.plan, ev.now
        if r.tracker.status in _TERMINAL:
            self._end_in_flight(k, out)      # failed while we wrote: post Failed now
            return
        partial = plan.partial
        self._set_phase(k, Phase.SENT if partial else Phase.DONE)
        self._uncount(k)
        k.sent_tokens = plan.sent_tokens_after
        k.chunks += 1
        r.deadline = now + self.request_timeout
        src = r.source
        self.stats.chunk(plan.tokens, k.session.row_bytes)
        msg = P.StatusMsg(r.room, _TRANSFERRING if partial else _SUCCESS, k.chunks, k.sent_tokens, plan.tokens,
                          src.total_tokens)
        if partial:
            if r.tracker.status is not _TRANSFERRING:
                r.tracker.set(_TRANSFERRING)
        elif all(x.done for x in r.ranks.values()):
            r.tracker.set(_SUCCESS)
            self.stats.request_succeeded(resumes=max(x.chunks for x in r.ranks.values()) - 1,
                                         latency_s=now - r.t0)
            self._finish(r, out)
        else:
            # this rank is done: ranks that already asked for their next
            # chunk were waiting for it (rule 5 gate)
            self._maybe_start(r, out)
        out.append(SendAfterWrite(k.session, msg))

    def _on_write_failed(self, ev: WriteFailed, out: list) -> None:
        """The write for ``k`` failed: it may still land, so ``k``'s blocks are
        unsafe until the connection is torn down."""
        r, k, reason = ev.room, ev.rank, ev.reason
        self._set_phase(k, Phase.UNSAFE)
        self._fail(r, reason, out, cause="transfer", code=FailCode.WRITE_FAILED)
        self._end_in_flight(k, out)

    def _on_write_skipped(self, ev: WriteSkipped, out: list) -> None:
        """The endpoint did not start (or cut short) ``k``'s write: the room was terminal."""
        self._end_in_flight(ev.rank, out)

    # ------------------------------------------------------------ liveness and time
    def _on_peer_lost(self, ev: LinkLost, out: list) -> None:
        """``s``'s connection is gone: its rooms fail (the other ranks are told)."""
        s, reason = ev.session, ev.reason
        if not s.alive:
            return
        s.alive = False
        sid = s.id
        reason = f"language rank {s.tp_rank} lost: {reason}"
        for r in list(self.rooms.values()):
            k = r.ranks.get(sid)
            if k is not None and k.session is s:
                self._fail(r, reason, out, cause="peer_lost", code=FailCode.PEER_LOST)

    def _on_tick(self, ev: Tick, out: list) -> None:
        now = ev.now
        for r in list(self.rooms.values()):
            if now > r.deadline:
                # an embedding registered that no rank asked for within request_timeout
                # expired (cause "expired": no failure of anyone's); anything else timed out
                unasked = r.source is not None and not r.ranks
                if r.source is not None:
                    self._let_go(r.room)     # its embedding expired: nobody will be sent it now
                self._fail(r, f"timed out in {r.tracker.status.name} after {self.request_timeout}s", out,
                           cause="expired" if unasked else "timeout", code=FailCode.TIMEOUT)

    def _on_close(self, ev: Close, out: list) -> None:
        for r in list(self.rooms.values()):
            self._fail(r, "encoder endpoint closed", out, cause="closed", code=FailCode.CLOSED)

    _HANDLERS: dict = {}            # event type -> handler, filled in below the class

    # ------------------------------------------------------------ queries
    def status(self, room: P.Room) -> Optional[Status]:
        r = self.rooms.get(room)
        if r is not None:
            return r.tracker.status
        return self.finished.get(room)

    # ------------------------------------------------------------ internals
    @staticmethod
    def _validate_dst(s: Session, msg) -> None:
        if msg.session_id != s.id:
            raise ProtocolError("session_id", f"{msg.session_id!r} on the channel of {s.id!r}")
        nb = s.layout.num_blocks
        if max(msg.dst_blocks) >= nb:
            bad = next(b for b in msg.dst_blocks if b >= nb)
            raise ProtocolError("dst_blocks", f"block {bad} out of range [0, {nb})")
        check_block_size(msg.allocated_tokens, msg.dst_blocks, s.layout.block_size)

    def _reject(self, s: Session, room: P.Room, reason: str, out: list, code: FailCode) -> None:
        """Fail one room for one rank that sent something refused (``code`` says why)."""
        self.stats["rejected"] += 1
        r = self.rooms.get(room)
        if r is not None and s.id in r.ranks:
            out.append(Reject(s, room, reason, None, code))
            self._fail(r, reason, out, code=code)
        else:
            out.append(Reject(s, room, reason, P.StatusMsg(room, Status.Failed, reason=reason[:1000], code=code),
                              code))

    def _maybe_start(self, r: Room, out: list) -> None:
        src = r.source
        if src is None or not r.required or len(r.ranks) < r.required:
            return
        if r.tracker.status in _TERMINAL:
            return
        active = [k for k in r.ranks.values() if not k.done]
        if not active or not all(k.pending for k in active):
            return  # rule 5: a round starts when every rank asked for it
        total = src.total_tokens
        for k in active:
            layout = k.session.layout
            if src.hidden != layout.hidden or src.dtype != layout.dtype:
                self._fail(r, f"embedding is {src.hidden} x {src.dtype}, rank pool is "
                              f"{layout.hidden} x {layout.dtype}", out, code=FailCode.LAYOUT_MISMATCH)
                return
            try:
                plan = plan_chunk(total, k.sent_tokens, k.allocated_tokens, layout.block_size, k.dst_blocks)
            except (ProtocolError, BlockSizeMismatch) as e:
                self._fail(r, str(e), out, cause="bad_message", code=FailCode.BAD_REQUEST)
                return
            self._set_phase(k, Phase.WRITING)
            out.append(Write(r, k, plan, k.chunks == 0, src, k.chunks + 1, r.ended))

    @staticmethod
    def _count(k: Rank) -> None:
        """``k``'s destination blocks are asked for (INIT/RESUME): count them
        against its session's bound until they are answered."""
        if not k.counted:
            k.counted = len(k.dst_blocks)
            k.session.live_blocks += k.counted

    @staticmethod
    def _uncount(k: Rank) -> None:
        """``k``'s blocks are answered (its chunk's STATUS, or Failed, is about
        to go out): the rank may reuse them."""
        if k.counted:
            k.session.live_blocks -= k.counted
            k.counted = 0

    def _end_in_flight(self, k: Rank, out: list) -> None:
        """``k``'s write is over; if the room failed meanwhile, its Failed goes out now."""
        unsafe = k.phase is Phase.UNSAFE
        self._set_phase(k, Phase.FAILED)
        self._uncount(k)
        msg, k.failed_msg = k.failed_msg, None
        if msg is not None:
            if self.orphans.get((k.session.id, msg.room)) is k:
                del self.orphans[(k.session.id, msg.room)]
            if unsafe and not msg.flags & P.FLAG_BLOCKS_UNSAFE:
                msg = replace(msg, flags=msg.flags | P.FLAG_BLOCKS_UNSAFE)
            out.append(SendAfterWrite(k.session, msg))

    def _fail(self, r: Room, reason: str, out: list, ack: Optional[Session] = None, cause: str = "error",
              *, code: FailCode) -> None:
        """``r`` fails; each live rank is told (a Failed with ``code``), after its write if one is out."""
        if not r.tracker.fail():
            return
        r.reason = reason
        r.cause = cause
        r.code = code
        self.stats.request_failed(cause)
        for k in r.ranks.values():
            in_flight = k.phase in _IN_FLIGHT
            if not in_flight:
                self._set_phase(k, Phase.FAILED)
            if k.session.alive:
                flags = (P.FLAG_BLOCKS_UNSAFE if k.phase is Phase.UNSAFE else 0) | \
                    (P.FLAG_ABORT_ACK if k.session is ack else 0)
                msg = P.StatusMsg(r.room, Status.Failed, k.chunks, k.sent_tokens, reason=reason[:1000], flags=flags,
                                  code=code)
                if in_flight:
                    k.failed_msg = msg      # sent once the write is over (written / write_failed / write_skipped)
                    self.orphans[(k.session.id, r.room)] = k
                else:
                    out.append(Send(k.session, msg))
        self._finish(r, out)

    def _finish(self, r: Room, out: list) -> None:
        if self.rooms.get(r.room) is r:
            del self.rooms[r.room]
        self.finished[r.room] = r.tracker.status
        while len(self.finished) > FINISHED_MEMORY:
            self.finished.popitem(last=False)
        for k in r.ranks.values():
            self.finished_inits[(k.session.id, r.room, k.nonce)] = None
            k.session.live_rooms -= 1
            if not k.in_flight:         # an in-flight write's blocks are answered once it is over
                self._uncount(k)
        while len(self.finished_inits) > FINISHED_MEMORY:
            self.finished_inits.popitem(last=False)
        r.source = None                 # a Write still out holds its own reference
        r.ended.set = True              # a Write still out stops at its next piece
        out.append(Done(r))



EncoderRooms._HANDLERS = {
    Register: EncoderRooms._on_register, Withdraw: EncoderRooms._on_withdraw, Expect: EncoderRooms._on_expect,
    InitReceived: EncoderRooms._on_init, ResumeReceived: EncoderRooms._on_resume,
    AbortReceived: EncoderRooms._on_abort, Written: EncoderRooms._on_written,
    WriteFailed: EncoderRooms._on_write_failed, WriteSkipped: EncoderRooms._on_write_skipped,
    LinkLost: EncoderRooms._on_peer_lost, Tick: EncoderRooms._on_tick, Close: EncoderRooms._on_close,
}
