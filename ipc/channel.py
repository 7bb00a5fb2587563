"""A control channel over a pair of shm rings (same host; see :mod:`embresume.ipc.ring`)."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Optional

from embresume.channel import Channel
from embresume.errors import PeerError
from embresume.ipc.ring import RingClosed, RingTimeout, ShmRing

log = logging.getLogger("embresume.ipc")


#: a link's outbound queue (frames that did not fit its ring): past either bound
#: a send raises PeerError and the endpoint tears the link down
MAX_QUEUED_FRAMES = 65536
MAX_QUEUED_BYTES = 16 << 20


class RingChannel(Channel):
    """Sends never wait for the peer: a frame that does not fit the ring now
    goes to this link's bounded outbound queue, which a writer thread of this
    link (started on first use) moves into the ring as the peer reads.  While
    frames wait, :meth:`stalled_for` says for how long the ring made no room;
    the endpoints tear a link down when that passes ``peer_timeout``."""

    kind = "shm-ring"
    dedicated = True

    def __init__(self, tx: ShmRing, rx: ShmRing, name: str = "ring", spin_us: int = 0):
        super().__init__()
        self.tx, self.rx = tx, rx
        #: seconds the reader looks for the next message before it sleeps (ShmRing.recv)
        self.spin = max(0, spin_us) * 1e-6
        self._stop = threading.Event()
        self._name = name
        self._thread = None
        self.closed = False
        self._qlock = threading.Lock()
        self._qcond = threading.Condition(self._qlock)
        self._queue: collections.deque = collections.deque()
        self._qbytes = 0
        self._stalled_since: Optional[float] = None
        self._broken = ""
        self._writer: Optional[threading.Thread] = None

    @classmethod
    def create_pair(cls, capacity: int) -> tuple[ShmRing, ShmRing]:
        return ShmRing.create(capacity), ShmRing.create(capacity)

    def start(self, on_message, on_error, on_closed=None) -> None:
        super().start(on_message, on_error, on_closed)
        self._thread = threading.Thread(target=self._run, name=f"embresume-{self._name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.rx.recv(timeout=1.0, spin=self.spin)   # close() wakes it at once
            except RingClosed:
                break
            except Exception as e:  # corrupt ring: the peer is broken
                log.error("control ring failed: %s", e)
                if self.on_error:
                    self.on_error(self, e)
                break
            if data is not None:
                self.deliver(data)
        if not self._stop.is_set() and self.on_closed:
            self.on_closed(self)

    def send_bytes(self, data: bytes) -> None:
        with self._qlock:
            if self.closed:
                raise PeerError("channel is closed")
            if self._broken:
                raise PeerError(self._broken)
            if not self._queue:
                try:
                    if self.tx.try_send(data):
                        return
                except RingClosed as e:
                    raise PeerError(f"control ring: {e}") from None
                except (ValueError, OSError) as e:  # too big, or raced with close()
                    raise PeerError(f"control ring is closed: {e}") from None
            if len(self._queue) >= MAX_QUEUED_FRAMES or self._qbytes + len(data) > MAX_QUEUED_BYTES:
                self._broken = (f"control ring full and {len(self._queue)} frames ({self._qbytes} bytes) queued "
                                "behind it: the peer does not read")
                raise PeerError(self._broken)
            self._queue.append(data)
            self._qbytes += len(data)
            if self._stalled_since is None:
                self._stalled_since = time.monotonic()
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_queued, name=f"embresume-{self._name}-tx",
                                                daemon=True)
                self._writer.start()
            else:
                self._qcond.notify()

    def _write_queued(self) -> None:
        """The link's writer: moves queued frames into the ring as room appears."""
        q = self._queue
        while True:
            with self._qlock:
                while not q and not self.closed:
                    self._qcond.wait(1.0)
                if self.closed:
                    return
                moved = False
                try:
                    while q and self.tx.try_send(q[0]):
                        self._qbytes -= len(q.popleft())
                        moved = True
                except (RingClosed, ValueError, OSError) as e:
                    self._broken = f"control ring: {e}"
                    q.clear()
                    self._qbytes = 0
                    self._stalled_since = None
                    return
                if not q:
                    self._stalled_since = None
                    continue
                if moved:
                    self._stalled_since = time.monotonic()
                need = len(q[0])
            self.tx.wait_space(need, 0.05)

    def stalled_for(self) -> float:
        """Seconds frames have waited for the peer to make room (0 when none wait)."""
        t = self._stalled_since
        return 0.0 if t is None else time.monotonic() - t

    def queued(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        with self._qlock:
            if self.closed:
                return
            self.closed = True
            self._qcond.notify_all()
            self._queue.clear()
            self._qbytes = 0
        try:
            self.tx.close_writer()
        except Exception:
            pass
        self._stop.set()
        try:
            self.rx.wake_reader()
        except Exception:
            pass
        me = threading.current_thread()
        for t in (self._thread, self._writer):
            if t is not None and t is not me:
                t.join(timeout=2)
        self.tx.close()
        self.rx.close()
