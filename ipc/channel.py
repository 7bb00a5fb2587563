"""A control channel over a pair of shm rings (same host; see :mod:`embresume.ipc.ring`)."""

from __future__ import annotations

import logging
import threading

from embresume.channel import Channel
from embresume.errors import PeerError
from embresume.ipc.ring import RingClosed, RingTimeout, ShmRing

log = logging.getLogger("embresume.ipc")


class RingChannel(Channel):
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
        if self.closed:
            raise PeerError("channel is closed")
        try:
            self.tx.send(data)
        except (RingClosed, RingTimeout) as e:
            raise PeerError(f"control ring: {e}") from None
        except (ValueError, OSError) as e:  # raced with close()
            raise PeerError(f"control ring is closed: {e}") from None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.tx.close_writer()
        except Exception:
            pass
        self._stop.set()
        try:
            self.rx.wake_reader()
        except Exception:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        self.tx.close()
        self.rx.close()
