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
* records its events once, in the endpoint's :class:`~embresume.metrics.EndpointStats`
  (its counters and the process-wide metrics in one call).

The endpoints (:mod:`embresume.language`, :mod:`embresume.encoder`) are the I/O
shells: they own links, threads, handshakes and the lock, feed the machine the
events their links bring, and carry out the actions it returns.  The machines
are tested on their own (tests/test_rooms_*.py), with hypothesis driving
random interleavings of events against their invariants.
"""

from ..errors import EmbResumeError


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
