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
