"""The vLLM consumer's per-item state (``receive: "scheduler"``), as a pure machine.

Written like :mod:`embresume.rooms`: events in (:meth:`ItemTracker.handle`),
actions out, no I/O, no clock (every event that needs the time carries
``now``).  The scheduler-side role object
(:class:`embresume.integrations._vllm_consumer.LandingScheduler`) feeds it
what vLLM and the endpoint tell it and carries out what it returns: starting
and aborting transfers, copying a received item into the landing region,
pinning and unpinning region entries, counting and logging.

One item per multimodal hash; its phase::

    pending ──Started──> transferring ──Polled(success)──> received ──Landed──> landed <──> pinned
       │  ^                  │                               │                  │
       │  └──Tick── retry_wait <──(failed, attempts left)─────┘                 └── Evicted: gone
       └─────────────────────┴──────── failed (no attempts left / final) ───────── gone when unneeded

* ``received``: the result waits in the receive pool until the landing region
  has room; landing evicts only landed items no waiting request needs, never
  one that is pinned.
* ``pinned``: reported present by ``has_cache_item`` in this scheduling step
  (until the step's ``build_connector_meta``), or named in a load the workers
  have not all reported yet.  A pinned item is never evicted or dropped.
* An item nobody waits for any more (its requests finished) is dropped:
  its transfer aborted, its received result given back.  A landed item stays
  (a later request may use it) until the region evicts it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from ..errors import FailCode
from ..status import Status


class Phase(str, enum.Enum):
    PENDING = "pending"              # a Start is out; the role reports Started / StartFailed
    TRANSFERRING = "transferring"    # the endpoint is receiving it
    RETRY_WAIT = "retry_wait"        # waiting to be started again (Tick past retry_at)
    RECEIVED = "received"            # in the receive pool, waiting for room in the landing region
    LANDED = "landed"                # in the landing region, unpinned
    PINNED = "pinned"                # in the landing region, reported present or being loaded
    FAILED = "failed"                # given up: recomputed locally or its requests failed


P = Phase

#: every phase change the machine makes; anything else raises
TRANSITIONS: dict[Phase, frozenset] = {
    P.PENDING: frozenset({P.TRANSFERRING, P.RETRY_WAIT, P.FAILED}),
    P.TRANSFERRING: frozenset({P.RECEIVED, P.RETRY_WAIT, P.FAILED}),
    P.RETRY_WAIT: frozenset({P.PENDING, P.FAILED}),
    P.RECEIVED: frozenset({P.LANDED, P.FAILED}),
    P.LANDED: frozenset({P.PINNED, P.PENDING}),
    P.PINNED: frozenset({P.LANDED}),
    P.FAILED: frozenset(),
}

#: phases an item may leave the tracker from (a pinned one never goes)
REMOVABLE = frozenset({P.PENDING, P.TRANSFERRING, P.RETRY_WAIT, P.RECEIVED, P.LANDED, P.FAILED})

#: the encoder's refusals of an INIT for a room another engine instance is being sent
#: (the room is published again when that ends): asked again shortly, not a failed attempt
BUSY_CODES = frozenset({FailCode.BUSY, FailCode.TP_GROUP})
BUSY_WAIT = 0.05


class TransitionError(RuntimeError):
    """The machine tried a phase change its table does not have (a bug)."""


@dataclass
class Item:
    mm_hash: str
    encoder: str
    num_embeds: int
    width: int
    born: float
    deadline: float                  # all attempts
    phase: Phase = P.PENDING
    waiting: set = field(default_factory=set)     # requests that need it and have not had it allocated
    attempts: int = 0
    started: float = 0.0             # this attempt
    retry_at: float = 0.0
    reason: str = ""
    reserved: bool = False           # reported present in this scheduling step
    loads: dict = field(default_factory=dict)     # load id -> worker reports outstanding


# ---------------------------------------------------------------- events
@dataclass(frozen=True)
class Need:
    """``ensure_cache_available``: request ``rid`` needs the item (created and started if new)."""
    rid: str
    mm_hash: str
    encoder: str
    num_embeds: int
    width: int
    now: float


@dataclass(frozen=True)
class Started:
    mm_hash: str
    now: float


@dataclass(frozen=True)
class StartFailed:
    """The endpoint refused the request: ``in_use`` (the last attempt's room has not ended
    yet: asked again shortly, no attempt counted), ``final`` (never worth trying again)."""
    mm_hash: str
    now: float
    reason: str
    in_use: bool = False
    final: bool = False


@dataclass(frozen=True)
class Polled:
    """The endpoint's status of a transfer; on ``Status.Success`` the role holds the result."""
    mm_hash: str
    now: float
    status: Status
    code: Optional[FailCode] = None
    reason: str = ""


@dataclass(frozen=True)
class Landed:
    mm_hash: str


@dataclass(frozen=True)
class NoRoom:
    """The landing region has no room for the received item now (``never``: nor ever)."""
    mm_hash: str
    now: float
    never: bool = False


@dataclass(frozen=True)
class Rejected:
    """The received item is unusable (its size is not the request's): given up at once."""
    mm_hash: str
    reason: str


@dataclass(frozen=True)
class Evicted:
    """The region reused a landed item's room (only ever one :meth:`ItemTracker.evictable` allowed)."""
    mm_hash: str


@dataclass(frozen=True)
class Reserve:
    """``has_cache_item`` answered yes: the item stays until this step's loads are out."""
    mm_hash: str


@dataclass(frozen=True)
class Alloc:
    """``update_state_after_alloc`` of a reserved item: the workers load it under ``load_id``
    (None: already named in this step's loads) and ``reports`` of them answer.  With no
    reports to wait for (vLLM's V1 runner drops the EC output of pipeline stages other than
    the last, and only the first loads), the load ends after ``lease_steps`` steps instead:
    by then every stage has run the step that loaded it."""
    rid: str
    mm_hash: str
    load_id: Optional[int]
    reports: int
    lease_steps: int = 0


@dataclass(frozen=True)
class LocalEncode:
    """``update_state_after_alloc`` of an item vLLM encodes itself."""
    rid: str
    mm_hash: str


@dataclass(frozen=True)
class StepEnd:
    """``build_connector_meta``: the scheduling step is over; its reservations lapse."""


@dataclass(frozen=True)
class LoadReported:
    load_id: int


@dataclass(frozen=True)
class RequestFinished:
    rid: str
    hashes: tuple


@dataclass(frozen=True)
class Tick:
    """Time passed: retries fall due, landing is tried again."""
    now: float


Event = Union[Need, Started, StartFailed, Polled, Landed, NoRoom, Rejected, Evicted, Reserve, Alloc,
              LocalEncode, StepEnd, LoadReported, RequestFinished, Tick]


# ---------------------------------------------------------------- actions
@dataclass(frozen=True)
class Start:
    """Ask the encoder for the item (then report Started or StartFailed)."""
    mm_hash: str
    encoder: str
    num_embeds: int
    width: int
    attempt: int


@dataclass(frozen=True)
class Discard:
    """Abort the transfer in flight and drop whatever it leaves."""
    mm_hash: str
    width: int
    reason: str


@dataclass(frozen=True)
class Land:
    """Copy the received result into the landing region (then report Landed / NoRoom / Rejected)."""
    mm_hash: str


@dataclass(frozen=True)
class Release:
    """Give the held received result (its pool blocks) back."""
    mm_hash: str


@dataclass(frozen=True)
class Pin:
    mm_hash: str


@dataclass(frozen=True)
class Unpin:
    mm_hash: str


@dataclass(frozen=True)
class Retrying:
    """An attempt failed and another follows (a fail-over)."""
    mm_hash: str
    attempt: int
    reason: str


@dataclass(frozen=True)
class GaveUp:
    """The item failed for good: its requests recompute it or fail."""
    mm_hash: str
    attempts: int
    reason: str


Action = Union[Start, Discard, Land, Release, Pin, Unpin, Retrying, GaveUp]


# ---------------------------------------------------------------- the machine
class ItemTracker:
    """Every item the consumer's scheduler is receiving, holding or has given up."""

    def __init__(self, *, max_attempts: int, failover_timeout: float, load_timeout: float):
        self.max_attempts = int(max_attempts)
        self.failover_timeout = float(failover_timeout)
        self.load_timeout = float(load_timeout)
        self.items: dict[str, Item] = {}
        # the same items by phase (kept at the one place phases change): the scheduler's hooks
        # look at the few items in one phase, never scan every item the region holds
        self._by_phase: dict[Phase, dict[str, Item]] = {ph: {} for ph in P}
        self._since: dict[str, float] = {}        # live request -> when it first needed an item
        self._needs: dict[str, set] = {}          # live request -> the items it asked for
        self._loads: dict[int, str] = {}          # load id -> mm_hash
        self._leases: dict[int, int] = {}         # load id -> steps left (loads nobody reports)
        self._handlers: dict[type, Callable] = {
            Need: self._need, Started: self._started, StartFailed: self._start_failed, Polled: self._polled,
            Landed: self._landed, NoRoom: self._no_room, Rejected: self._rejected, Evicted: self._evicted,
            Reserve: self._reserve, Alloc: self._alloc, LocalEncode: self._local, StepEnd: self._step_end,
            LoadReported: self._load_reported, RequestFinished: self._request_finished, Tick: self._tick,
        }

    # ------------------------------------------------------------ queries
    def get(self, mm_hash: str) -> Optional[Item]:
        return self.items.get(mm_hash)

    def phase(self, mm_hash: str) -> Optional[Phase]:
        it = self.items.get(mm_hash)
        return None if it is None else it.phase

    def present(self, mm_hash: str) -> bool:
        """In the landing region (landed or pinned)."""
        return self.phase(mm_hash) in (P.LANDED, P.PINNED)

    def evictable(self, mm_hash: str, for_hash: Optional[str] = None) -> bool:
        """Whether the region may reuse this item's room: landed and unpinned, and nobody
        waits for it, or (to land ``for_hash``) only requests that still wait for another
        item and are younger than the oldest one waiting for ``for_hash``.  Without that
        second rule requests of several items deadlock on a small region: A's first item
        and B's first item fill it, and neither second item can land.  The oldest waiting
        request always gets its room, so the younger one's item is transferred again later
        instead (never the other way round: no ping-pong); an item whose requests have
        everything landed is about to be loaded and stays."""
        it = self.items.get(mm_hash)
        if it is None:
            return True
        if it.phase is not P.LANDED:
            return False
        if not it.waiting:
            return True
        other = self.items.get(for_hash) if for_hash is not None else None
        return (other is not None and self._age(it) > self._age(other)
                and all(self._incomplete(r) for r in it.waiting))

    def _incomplete(self, rid: str) -> bool:
        """Whether request ``rid`` still waits for an item that is not in the region."""
        for h in self._needs.get(rid, ()):
            x = self.items.get(h)
            if x is not None and rid in x.waiting and x.phase not in (P.LANDED, P.PINNED):
                return True
        return False

    def _age(self, it: Item) -> float:
        """When the oldest request waiting for ``it`` first needed an item (inf: nobody)."""
        return min((self._since.get(r, float("inf")) for r in it.waiting), default=float("inf"))

    def in_phase(self, *phases: Phase) -> list[Item]:
        if len(phases) == 1:
            return list(self._by_phase[phases[0]].values())
        return [it for it in self.items.values() if it.phase in phases]

    def poll_matters(self, it: Item, status: Status, now: float) -> bool:
        """Whether a :class:`Polled` of ``it`` with ``status`` at ``now`` can change anything
        (a final status, or a deadline passed): the shell polls every open transfer and
        makes an event only of those, so a poll that changes nothing costs no event."""
        return (status in (Status.Success, Status.Failed)
                or now > min(it.deadline, it.started + self.failover_timeout))

    def count(self, phase: Phase) -> int:
        return len(self._by_phase[phase])

    def busy(self) -> bool:
        """Anything but idle landed items: transfers, results, loads, failed items still needed."""
        return len(self.items) != len(self._by_phase[P.LANDED])

    # ------------------------------------------------------------ entry
    def handle(self, event: Event) -> list[Action]:
        out: list[Action] = []
        self._handlers[type(event)](event, out)
        return out

    # ------------------------------------------------------------ internals
    def _to(self, it: Item, phase: Phase) -> None:
        if phase not in TRANSITIONS[it.phase]:
            raise TransitionError(f"{it.mm_hash}: {it.phase.value} -> {phase.value} is not a transition")
        del self._by_phase[it.phase][it.mm_hash]
        it.phase = phase
        self._by_phase[phase][it.mm_hash] = it

    def _remove(self, it: Item) -> None:
        if it.phase not in REMOVABLE:
            raise TransitionError(f"{it.mm_hash}: an item {it.phase.value} cannot be dropped")
        del self.items[it.mm_hash]
        del self._by_phase[it.phase][it.mm_hash]

    def _start(self, it: Item, out: list) -> None:
        if it.phase is not P.PENDING:
            self._to(it, P.PENDING)
        it.attempts += 1
        out.append(Start(it.mm_hash, it.encoder, it.num_embeds, it.width, it.attempts))

    def _attempt_failed(self, it: Item, now: float, reason: str, out: list, final: bool = False) -> None:
        it.reason = reason
        backoff = min(1.0, 0.1 * 2 ** (it.attempts - 1))
        if not final and it.attempts < self.max_attempts and now + backoff < it.deadline:
            self._to(it, P.RETRY_WAIT)
            it.retry_at = now + backoff
            out.append(Retrying(it.mm_hash, it.attempts, reason))
            return
        if it.phase is P.RECEIVED:
            out.append(Release(it.mm_hash))
        self._to(it, P.FAILED)
        out.append(GaveUp(it.mm_hash, it.attempts, reason))
        if not it.waiting:
            self._remove(it)

    def _wait_busy(self, it: Item, now: float, reason: str) -> None:
        # not an attempt: the room is somebody else's right now, or ours has not ended yet
        self._to(it, P.RETRY_WAIT)
        it.retry_at, it.attempts, it.reason = now + BUSY_WAIT, it.attempts - 1, reason

    def _unpin_if_idle(self, it: Item, out: list) -> None:
        if it.phase is P.PINNED and not it.reserved and not it.loads:
            self._to(it, P.LANDED)
            out.append(Unpin(it.mm_hash))

    # ------------------------------------------------------------ handlers
    def _need(self, ev: Need, out: list) -> None:
        self._since.setdefault(ev.rid, ev.now)
        self._needs.setdefault(ev.rid, set()).add(ev.mm_hash)
        it = self.items.get(ev.mm_hash)
        if it is None:
            it = self.items[ev.mm_hash] = Item(ev.mm_hash, ev.encoder, ev.num_embeds, ev.width, born=ev.now,
                                               deadline=ev.now + self.load_timeout)
            self._by_phase[it.phase][it.mm_hash] = it
            it.waiting.add(ev.rid)
            self._start(it, out)
            return
        it.waiting.add(ev.rid)

    def _started(self, ev: Started, out: list) -> None:
        it = self.items.get(ev.mm_hash)
        if it is None or it.phase is not P.PENDING:
            return
        self._to(it, P.TRANSFERRING)
        it.started = ev.now

    def _start_failed(self, ev: StartFailed, out: list) -> None:
        it = self.items.get(ev.mm_hash)
        if it is None or it.phase is not P.PENDING:
            return
        if ev.in_use and ev.now < it.deadline:
            self._wait_busy(it, ev.now, ev.reason)
            return
        self._attempt_failed(it, ev.now, ev.reason, out, final=ev.final)

    def _polled(self, ev: Polled, out: list) -> None:
        it = self.items.get(ev.mm_hash)
        if it is None or it.phase is not P.TRANSFERRING:
            return
        now = ev.now
        if ev.status is Status.Success:
            self._to(it, P.RECEIVED)
            out.append(Land(it.mm_hash))
        elif ev.status is Status.Failed:
            if ev.code in BUSY_CODES and now < it.deadline:
                # another engine instance is being sent this item right now: the producer
                # publishes it again when that ends; wait a little, it is no failed attempt
                self._wait_busy(it, now, ev.reason)
                return
            # NOT_PUBLISHED: the producer let go of the item; asking again is no use
            self._attempt_failed(it, now, f"from {it.encoder}: {ev.reason}", out,
                                 final=ev.code is FailCode.NOT_PUBLISHED)
        elif now > it.deadline:
            reason = f"not complete within load_timeout={self.load_timeout:g}s"
            out.append(Discard(it.mm_hash, it.width, reason))
            self._attempt_failed(it, now, reason, out, final=True)
        elif ev.status in (Status.Bootstrapping, Status.WaitingForInput) \
                and now - it.started > self.failover_timeout:
            reason = f"no data from {it.encoder} within failover_timeout={self.failover_timeout:g}s"
            out.append(Discard(it.mm_hash, it.width, reason))
            self._attempt_failed(it, now, reason, out)

    def _landed(self, ev: Landed, out: list) -> None:
        it = self.items[ev.mm_hash]
        self._to(it, P.LANDED)

    def _no_room(self, ev: NoRoom, out: list) -> None:
        it = self.items[ev.mm_hash]
        if it.phase is not P.RECEIVED:
            raise TransitionError(f"{it.mm_hash}: no room reported while {it.phase.value}")
        if ev.never or ev.now > it.deadline:
            self._attempt_failed(it, ev.now, "found no room in the landing region (landing_bytes)", out,
                                 final=True)

    def _rejected(self, ev: Rejected, out: list) -> None:
        it = self.items[ev.mm_hash]
        self._attempt_failed(it, it.deadline, ev.reason, out, final=True)

    def _evicted(self, ev: Evicted, out: list) -> None:
        it = self.items.get(ev.mm_hash)
        if it is None:
            return
        if it.phase is not P.LANDED:
            raise TransitionError(f"{it.mm_hash}: evicted while {it.phase.value}")
        if not it.waiting:
            self._remove(it)
            return
        # made room for an older request's item: transferred again for its younger requests
        # (not a failed attempt)
        it.attempts -= 1
        it.reason = "evicted from the landing region for an older request's item"
        self._start(it, out)

    def _reserve(self, ev: Reserve, out: list) -> None:
        it = self.items[ev.mm_hash]
        if it.phase is P.LANDED:
            self._to(it, P.PINNED)
            out.append(Pin(it.mm_hash))
        elif it.phase is not P.PINNED:
            raise TransitionError(f"{it.mm_hash}: reserved while {it.phase.value}")
        it.reserved = True

    def _alloc(self, ev: Alloc, out: list) -> None:
        it = self.items[ev.mm_hash]
        if it.phase is not P.PINNED:
            raise TransitionError(f"{it.mm_hash}: loaded while {it.phase.value} (not reported present)")
        it.waiting.discard(ev.rid)
        if ev.load_id is not None:
            it.loads[ev.load_id] = max(0, int(ev.reports))
            self._loads[ev.load_id] = it.mm_hash
            if ev.reports <= 0:
                self._leases[ev.load_id] = max(1, int(ev.lease_steps))

    def _local(self, ev: LocalEncode, out: list) -> None:
        it = self.items.get(ev.mm_hash)
        if it is None:
            return
        it.waiting.discard(ev.rid)
        if it.phase is P.FAILED and not it.waiting:
            self._remove(it)

    def _step_end(self, ev: StepEnd, out: list) -> None:
        for it in list(self._by_phase[P.PINNED].values()):     # reserved items are pinned
            if it.reserved:
                it.reserved = False
                self._unpin_if_idle(it, out)
        for load_id in list(self._leases):
            self._leases[load_id] -= 1
            if self._leases[load_id] <= 0:
                del self._leases[load_id]
                it = self.items[self._loads.pop(load_id)]
                del it.loads[load_id]
                self._unpin_if_idle(it, out)

    def _load_reported(self, ev: LoadReported, out: list) -> None:
        h = self._loads.get(ev.load_id)
        it = self.items.get(h) if h is not None else None
        if it is None or ev.load_id not in it.loads or ev.load_id in self._leases:
            return
        it.loads[ev.load_id] -= 1
        if it.loads[ev.load_id] <= 0:
            del it.loads[ev.load_id]
            del self._loads[ev.load_id]
            self._unpin_if_idle(it, out)

    def _request_finished(self, ev: RequestFinished, out: list) -> None:
        self._since.pop(ev.rid, None)
        self._needs.pop(ev.rid, None)
        for h in ev.hashes:
            it = self.items.get(h)
            if it is None:
                continue
            it.waiting.discard(ev.rid)
            if it.waiting or it.phase in (P.LANDED, P.PINNED):
                continue
            if it.phase is P.TRANSFERRING:
                out.append(Discard(h, it.width, "the language scheduler no longer needs it"))
            elif it.phase is P.RECEIVED:
                out.append(Release(h))
            self._remove(it)

    def _tick(self, ev: Tick, out: list) -> None:
        due = [*self._by_phase[P.RETRY_WAIT].values(), *self._by_phase[P.RECEIVED].values()]
        for it in sorted(due, key=lambda i: i.born):
            if it.phase is P.RETRY_WAIT and ev.now >= it.retry_at:
                self._start(it, out)
            elif it.phase is P.RECEIVED:
                out.append(Land(it.mm_hash))
