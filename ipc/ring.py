"""A single-producer single-consumer message ring in POSIX shared memory.

Memory layout of the segment (all integers little-endian u64, each on its own
cache line so producer and consumer never write the same line)::

    offset   0  head      bytes consumed so far      (written by the reader)
    offset  64  tail      bytes produced so far      (written by the writer)
    offset 128  capacity  size of the data area
    offset 136  closed    set to 1 by the writer's close()
    offset 192  data[capacity]

A message is a u32 length followed by the payload, padded to 8 bytes; both
may wrap around the end of the data area.  Two POSIX semaphores signal the
other side: ``<name>.i`` counts published messages (the reader waits on it,
after spinning briefly), ``<name>.s`` wakes a writer that found the ring full.

One ring carries one direction; a channel is a pair.  Writers in several
threads of one process are serialised by a lock; there is one reader thread.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Optional

import posix_ipc

from embresume.ipc import shm as _shm

HEADER = 192
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_HEAD, _TAIL, _CAP, _CLOSED = 0, 64, 128, 136


class RingClosed(EOFError):
    """The writer closed the ring and every message was read."""


class RingTimeout(TimeoutError):
    pass


class ShmRing:
    def __init__(self, seg: _shm.ShmSegment, items: posix_ipc.Semaphore, space: posix_ipc.Semaphore,
                 spin: int = 0):
        self.seg = seg
        self.name = seg.name
        self._mv = memoryview(seg._mm)
        self.capacity = _U64.unpack_from(self._mv, _CAP)[0]
        self._items = items
        self._space = space
        self._spin = spin
        self._wlock = threading.Lock()
        self._pending = 0  # messages acquired from the semaphore but not yet read (reader side)

    # ----------------------------------------------------------- set-up
    @classmethod
    def create(cls, capacity: int = 1 << 20) -> "ShmRing":
        capacity = max(4096, (capacity + 7) // 8 * 8)
        seg = _shm.ShmSegment.create(HEADER + capacity, tag="ring-", prefault=True)
        _U64.pack_into(seg._mm, _CAP, capacity)
        items = posix_ipc.Semaphore(seg.name + ".i", posix_ipc.O_CREX, mode=0o600, initial_value=0)
        _shm.remember_semaphore(items.name)
        space = posix_ipc.Semaphore(seg.name + ".s", posix_ipc.O_CREX, mode=0o600, initial_value=0)
        _shm.remember_semaphore(space.name)
        return cls(seg, items, space)

    @classmethod
    def attach(cls, name: str) -> "ShmRing":
        probe = _shm.ShmSegment.attach(name, HEADER)
        capacity = _U64.unpack_from(probe._mm, _CAP)[0]
        probe.close()
        seg = _shm.ShmSegment.attach(name, HEADER + capacity)
        return cls(seg, posix_ipc.Semaphore(name + ".i"), posix_ipc.Semaphore(name + ".s"))

    def unlink(self) -> None:
        """Remove the names (both sides keep their mappings)."""
        if self.seg.owner:
            self.seg.unlink()
            for sem in (self._items, self._space):
                _shm.unlink_semaphore(sem.name)

    # ----------------------------------------------------------- helpers
    def _get(self, off: int) -> int:
        return _U64.unpack_from(self._mv, off)[0]

    def _put(self, off: int, v: int) -> None:
        _U64.pack_into(self._mv, off, v)

    def _copy_in(self, pos: int, data) -> None:
        cap = self.capacity
        p = pos % cap
        n = len(data)
        first = min(n, cap - p)
        self._mv[HEADER + p:HEADER + p + first] = data[:first]
        if first < n:
            self._mv[HEADER:HEADER + n - first] = data[first:]

    def _copy_out(self, pos: int, n: int) -> bytes:
        cap = self.capacity
        p = pos % cap
        first = min(n, cap - p)
        out = bytes(self._mv[HEADER + p:HEADER + p + first])
        if first < n:
            out += bytes(self._mv[HEADER:HEADER + n - first])
        return out

    # ----------------------------------------------------------- writer
    def send(self, data: bytes, timeout: float = 5.0) -> None:
        need = (4 + len(data) + 7) // 8 * 8
        if need > self.capacity:
            raise ValueError(f"message of {len(data)} bytes does not fit a ring of {self.capacity}")
        deadline = time.monotonic() + timeout
        with self._wlock:
            if self._get(_CLOSED):
                raise RingClosed("ring is closed")
            while True:
                tail = self._get(_TAIL)
                if self.capacity - (tail - self._get(_HEAD)) >= need:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RingTimeout(f"ring {self.name} full for {timeout:.1f}s (reader stalled?)")
                try:
                    self._space.acquire(min(left, 0.01))
                except posix_ipc.BusyError:
                    pass
            self._copy_in(tail, _U32.pack(len(data)))
            self._copy_in(tail + 4, data)
            self._put(_TAIL, tail + need)
            self._items.release()

    def close_writer(self) -> None:
        with self._wlock:
            self._put(_CLOSED, 1)
            self._items.release()

    # ----------------------------------------------------------- reader
    def recv(self, timeout: Optional[float] = None) -> Optional[bytes]:
        """Next message, or None after ``timeout`` seconds without one.

        Raises :class:`RingClosed` once the writer closed and the ring is empty.
        """
        if not self._pending:
            got = False
            for _ in range(self._spin):
                try:
                    self._items.acquire(0)
                    got = True
                    break
                except posix_ipc.BusyError:
                    pass
            if not got:
                try:
                    self._items.acquire(timeout)
                except posix_ipc.BusyError:
                    return None
            self._pending += 1
        head = self._get(_HEAD)
        if head == self._get(_TAIL):
            # the wake-up came from close_writer()
            self._pending -= 1
            if self._get(_CLOSED):
                raise RingClosed("writer closed the ring")
            return None
        n = _U32.unpack(self._copy_out(head, 4))[0]
        if n > self.capacity:
            raise ValueError(f"corrupt ring {self.name}: message length {n}")
        data = self._copy_out(head + 4, n)
        self._put(_HEAD, head + (4 + n + 7) // 8 * 8)
        self._pending -= 1
        if self._space.value == 0:
            self._space.release()
        return data

    def close(self) -> None:
        self.unlink()
        for sem in (self._items, self._space):
            try:
                sem.close()
            except posix_ipc.ExistentialError:
                pass
        self._mv.release()
        self.seg.close()
