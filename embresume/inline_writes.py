"""Which thread writes a chunk on the encoder side: the one that caused it, or the rank's worker.

A same-host rank's ring reader writes the chunks its own INIT or RESUME
started right after handling the message (it has nothing else to do), and an
application thread in ``send`` / ``send_tensors`` writes a small first chunk
for a same-host rank whose INIT is already here: a memory copy, cheaper
than a hand-off to the rank's worker thread.  Anything else (a network
write, which a stalled peer could hold) goes to the rank's worker.

:class:`InlineWrites` keeps, per thread, the writes it will do itself: the
endpoint opens a batch before it feeds the room machine (:meth:`open`),
collects the writes there while it holds its lock (:meth:`here` says whether
this thread takes one), and runs them once the lock is released (:meth:`run`).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger("embresume.encoder")

#: a chunk up to this many embedding bytes is written by the thread that
#: registered it (send/send_tensors) when its INIT is already here
INLINE_WRITE_BYTES = 256 << 10


class InlineWrites:
    """The writes each thread does itself once the lock is released (see the module docstring)."""

    def __init__(self) -> None:
        self._tls = threading.local()

    def open(self, peer=None) -> bool:
        """Start collecting this thread's writes: ``peer`` is the rank whose
        reader thread this is (None: an application thread).  False, changing
        nothing, when a batch is already open on this thread."""
        t = self._tls
        if getattr(t, "jobs", None) is not None:
            return False
        t.peer, t.jobs = peer, []
        return True

    def here(self, peer, tokens: int) -> bool:
        """Whether this thread writes a chunk of ``tokens`` tokens for ``peer``
        itself: its ring reader always, an application thread when the chunk
        is small and goes to a same-host peer, no other thread."""
        t = self._tls
        if getattr(t, "jobs", None) is None:
            return False
        if t.peer is peer:
            return True
        return t.peer is None and peer.channel.dedicated and tokens * peer.sess.row_bytes <= INLINE_WRITE_BYTES

    def add(self, job: Callable[[], None]) -> None:
        self._tls.jobs.append(job)

    def run(self, guard: bool = False) -> None:
        """Close the batch and do its writes (``guard``: log a write that raises
        and go on; a write reports its own failures, so that is a bug)."""
        t = self._tls
        jobs, t.jobs = t.jobs, None
        for job in jobs:
            if not guard:
                job()
                continue
            try:
                job()
            except Exception:
                log.exception("inline write failed")
