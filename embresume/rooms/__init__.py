"""The room logic of each side as a state machine that does no I/O.

The way h11 and h2 keep HTTP's state apart from sockets: a machine holds the
state of every room (request) of one endpoint and is driven by *events*, one
method call each (a decoded message from a peer, a copy that finished, the
clock), and answers with *actions*, a list of plain objects that the endpoint
carries out in order (send this message to that peer, copy these blocks,
deliver this result, tear that link down).  A machine

* never touches a socket, a ring, a thread, a lock or the clock (``now`` is an
  argument), and never blocks;
* owns every resource its rooms hold: on the language side the block
  ledger (docs/design.md, section 5: each pool block has exactly one owner
  at each moment), on the encoder side the per-session bounds;
* counts its events as data, in its :class:`Tally` (``machine.stats``):
  the endpoint records the tally into its
  :class:`~embresume.metrics.EndpointStats` (its counters and the
  process-wide metrics, whose locks are taken there) after each event, never
  inside one.

The endpoints (:mod:`embresume.language`, :mod:`embresume.encoder`) are the I/O
shells: they own links, threads, handshakes and the lock, feed the machine the
events their links bring, and carry out the actions it returns.  The machines
are tested on their own (tests/test_rooms_*.py), with hypothesis driving
random interleavings of events against their invariants.
"""

import collections
from typing import Optional

from ..errors import EmbResumeError
from ..metrics import EndpointStats


class PhaseError(EmbResumeError, RuntimeError):
    """A machine tried a phase change its table does not hold: a bug in the
    machine (no peer's message can cause one; peers' messages are checked first)."""

    def __init__(self, what: str, old, new):
        super().__init__(f"{what} phase transition {old.name} -> {new.name} is not in the table")
        self.what, self.old, self.new = what, old, new


def check_phase(table: dict, what: str, old, new) -> None:
    """Raise :class:`PhaseError` unless ``table[old]`` holds ``new``."""
    if new not in table[old]:
        raise PhaseError(what, old, new)


_STARTED, _CHUNK, _FAILED = EndpointStats.request_started, EndpointStats.chunk, EndpointStats.request_failed


def _succeeded(stats, resumes: int, latency_s: float, wasted_tokens: int) -> None:
    stats.request_succeeded(resumes=resumes, latency_s=latency_s, wasted_tokens=wasted_tokens)


class Tally:
    """A machine's counts, kept as plain data during its events (no lock, no
    metrics call): the calls of :class:`~embresume.metrics.EndpointStats`
    a machine makes (``request_started``, ``chunk``, ``request_succeeded``,
    ``request_failed``, ``pool``, ``tally[name] += n``), remembered in order.
    The endpoint calls :meth:`record` after the machine's event, which makes
    the same calls on the endpoint's :class:`~embresume.metrics.EndpointStats`
    (``into``: given here, or bound once at construction) and empties the tally.

    ``tally[name]`` reads what was counted since the last :meth:`record`."""

    __slots__ = ("into", "counts", "calls", "pool_used")

    def __init__(self, into=None):
        self.into = into
        self.counts: collections.Counter = collections.Counter()
        self.calls: list = []
        self.pool_used: Optional[int] = None

    def __getitem__(self, name: str) -> int:
        return self.counts[name]

    def __setitem__(self, name: str, n: int) -> None:
        self.counts[name] = n

    def request_started(self, hinted: bool = False) -> None:
        self.calls.append((_STARTED, (hinted,)))

    def chunk(self, tokens: int, row_bytes: int) -> None:
        self.calls.append((_CHUNK, (tokens, row_bytes)))

    def request_succeeded(self, *, resumes: int, latency_s: float, wasted_tokens: int = 0) -> None:
        self.calls.append((_succeeded, (resumes, latency_s, wasted_tokens)))

    def request_failed(self, cause: str) -> None:
        self.calls.append((_FAILED, (cause,)))

    def pool(self, used_blocks: int) -> None:
        self.pool_used = used_blocks        # a gauge: the last value is the one recorded

    def __bool__(self) -> bool:
        return bool(self.calls or self.counts or self.pool_used is not None)

    def record(self, into=None) -> None:
        """(The endpoint, after an event) Make the counted calls on ``into``
        (default: the one bound at construction) and empty the tally."""
        stats = self.into if into is None else into
        if self.counts:
            counts, self.counts = self.counts, collections.Counter()
            for name, n in counts.items():
                stats[name] += n
        if self.calls:
            calls, self.calls = self.calls, []
            for f, args in calls:
                f(stats, *args)
        if self.pool_used is not None:
            used, self.pool_used = self.pool_used, None
            stats.pool(used)

