"""A single-producer single-consumer message ring in shared memory.

Memory layout of the segment (a sealed memfd, :mod:`embresume.ipc.shm`; all
integers little-endian u64, each on its own cache line so producer and
consumer never write the same line)::

    offset   0  head      bytes consumed so far      (written by the reader)
    offset  64  tail      bytes produced so far      (written by the writer)
    offset 128  capacity  size of the data area
    offset 136  closed    set to 1 by the writer's close()
    offset 144  waiting   1 while the writer waits for space (written by the writer)
    offset 192  data[capacity]

A message is a u32 length followed by the payload, padded to 8 bytes; both
may wrap around the end of the data area.  Two eventfds (anonymous, handed
to the peer with the segment) ring the other side's doorbell: ``items``
after a message is published (the reader sleeps in ``poll`` on it when the
ring is empty), ``space`` after the reader consumed while the writer waits.
A doorbell read resets its counter; the reader then drains everything
published, so one wake-up can serve many messages.

Before it sleeps, a reader that has just received a message may spin for
``spin`` seconds on the tail (``os.sched_yield`` between looks, which drops
the GIL and gives the core to anything runnable): the answer to a message
usually comes within a few hundred microseconds, and a thread that slept
pays for the wake-up (an idle vCPU halts, and the thread then runs on cold
caches; on the 2-core development VM the bench's same-run A/B of a 1-token
request gave 221 us p50 sleeping against 183 us with the encoder spinning
200 us).  An idle ring never spins: the spin follows a received message only.

One ring carries one direction; a channel is a pair.  Writers in several
threads of one process are serialised by a lock; there is one reader thread.
The capacity is read once when the ring is opened: a peer that rewrites the
header later cannot make this side read or write outside the segment.
"""

from __future__ import annotations

import os
import select
import struct
import threading
import time
from typing import Optional

from embresume.ipc import shm as _shm

HEADER = 192
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_HEAD, _TAIL, _CAP, _CLOSED, _WAITING = 0, 64, 128, 136, 144
MIN_CAPACITY = 4096
MAX_CAPACITY = 1 << 30


class RingClosed(EOFError):
    """The writer closed the ring and every message was read."""


class RingTimeout(TimeoutError):
    pass


def _new_doorbell() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _check_doorbell(fd: int) -> None:
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise ValueError(f"cannot inspect the peer's doorbell fd: {e.strerror}") from None
    if kind != "anon_inode:[eventfd]":
        raise ValueError(f"the peer's doorbell is not an eventfd ({kind})")


def _ring(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:      # counter saturated: the other side has wake-ups pending anyway
        pass


def _wait(fd: int, timeout: Optional[float]) -> bool:
    """Sleep until the doorbell rang (True) or ``timeout`` seconds passed (False); resets it."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    if not p.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))):
        return False
    try:
        os.eventfd_read(fd)
    except BlockingIOError:      # read by someone else meanwhile: a spurious wake-up
        pass
    return True


class ShmRing:
    def __init__(self, seg: _shm.ShmSegment, items: int, space: int, owner: bool):
        self.seg = seg
        self.name = seg.name
        self._mv = memoryview(seg._mm)
        self.capacity = _U64.unpack_from(self._mv, _CAP)[0]
        self._items = items
        self._space = space
        self.owner = owner
        self._wlock = threading.Lock()
        self._closed = False
        self._woken = False
        self._active = False     # the last recv() returned a message: the next may spin

    # ----------------------------------------------------------- set-up
    @classmethod
    def create(cls, capacity: int = 1 << 20) -> "ShmRing":
        capacity = min(MAX_CAPACITY, max(MIN_CAPACITY, (capacity + 7) // 8 * 8))
        seg = _shm.ShmSegment.create(HEADER + capacity, tag="ring", prefault=True)
        _U64.pack_into(seg._mm, _CAP, capacity)
        try:
            items = _new_doorbell()
        except BaseException:
            seg.close()
            raise
        try:
            space = _new_doorbell()
        except BaseException:
            os.close(items)
            seg.close()
            raise
        return cls(seg, items, space, owner=True)

    def handles(self) -> list[int]:
        """The fds a peer needs to open this ring (segment, items doorbell, space doorbell)."""
        if not self.owner or self.seg.fd is None:
            raise ValueError("only the creator of a ring can hand it out")
        return [self.seg.fd, self._items, self._space]

    @classmethod
    def from_handles(cls, fds) -> "ShmRing":
        """Open a peer's ring from the fds of :meth:`handles` (the caller keeps them;
        the ring holds its own duplicates).  Raises ValueError on anything but a
        sealed memfd and two eventfds."""
        if not isinstance(fds, (list, tuple)) or len(fds) != 3 or not all(isinstance(x, int) for x in fds):
            raise ValueError("a ring is described by three fds (segment, items, space)")
        seg_fd, items, space = fds
        size = _shm.check_sealed(seg_fd, HEADER + MIN_CAPACITY, "control ring")
        for fd in (items, space):
            _check_doorbell(fd)
        probe = _shm.ShmSegment.from_fd(seg_fd, HEADER, what="control ring")
        capacity = _U64.unpack_from(probe._mm, _CAP)[0]
        probe.close()
        if capacity % 8 or not MIN_CAPACITY <= capacity <= min(MAX_CAPACITY, size - HEADER):
            raise ValueError(f"the peer's control ring claims a capacity of {capacity} bytes in a "
                             f"segment of {size}")
        seg = _shm.ShmSegment.from_fd(seg_fd, HEADER + capacity, what="control ring")
        return cls(seg, os.dup(items), os.dup(space), owner=False)

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
            if self._closed or self._get(_CLOSED):
                raise RingClosed("ring is closed")
            while True:
                tail = self._get(_TAIL)
                if self.capacity - (tail - self._get(_HEAD)) >= need:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RingTimeout(f"ring {self.name} full for {timeout:.1f}s (reader stalled?)")
                # say we wait, then look again: a reader that consumed in between
                # either sees the flag (and rings) or left the space we now see
                self._put(_WAITING, 1)
                if self.capacity - (tail - self._get(_HEAD)) < need:
                    _wait(self._space, min(left, 0.05))
                self._put(_WAITING, 0)
            self._publish(tail, need, data)

    def try_send(self, data: bytes) -> bool:
        """Publish ``data`` if the ring has room for it now; False when it is full
        (never waits).  Raises RingClosed, and ValueError for a message larger
        than the ring."""
        need = (4 + len(data) + 7) // 8 * 8
        if need > self.capacity:
            raise ValueError(f"message of {len(data)} bytes does not fit a ring of {self.capacity}")
        with self._wlock:
            if self._closed or self._get(_CLOSED):
                raise RingClosed("ring is closed")
            tail = self._get(_TAIL)
            if self.capacity - (tail - self._get(_HEAD)) < need:
                return False
            self._publish(tail, need, data)
            return True

    def _publish(self, tail: int, need: int, data: bytes) -> None:
        """Write one frame at ``tail`` (room checked, write lock held), move the
        tail past it and ring the reader's doorbell."""
        p = tail % self.capacity
        if p + 4 + len(data) <= self.capacity:   # the usual case: no wrap-around
            _U32.pack_into(self._mv, HEADER + p, len(data))
            self._mv[HEADER + p + 4:HEADER + p + 4 + len(data)] = data
        else:
            self._copy_in(tail, _U32.pack(len(data)))
            self._copy_in(tail + 4, data)
        self._put(_TAIL, tail + need)
        _ring(self._items)

    def wait_space(self, nbytes: int, timeout: float) -> None:
        """Sleep until the reader consumed (its doorbell) or ``timeout`` seconds
        passed, unless a message of ``nbytes`` fits already.  For the one thread
        that writes what did not fit (:class:`~embresume.ipc.channel.RingChannel`'s
        writer); it holds no lock while it sleeps."""
        need = (4 + nbytes + 7) // 8 * 8
        if self._closed:
            return
        try:
            self._put(_WAITING, 1)
            if self.capacity - (self._get(_TAIL) - self._get(_HEAD)) < need:
                _wait(self._space, timeout)
            self._put(_WAITING, 0)
        except (ValueError, OSError):       # closed meanwhile
            pass

    def close_writer(self) -> None:
        with self._wlock:
            if not self._closed:
                self._put(_CLOSED, 1)
                _ring(self._items)

    def wake_reader(self) -> None:
        """Wake this side's reader out of :meth:`recv` (it returns None)."""
        with self._wlock:
            if not self._closed:
                self._woken = True
                _ring(self._items)

    # ----------------------------------------------------------- reader
    def recv(self, timeout: Optional[float] = None, spin: float = 0.0) -> Optional[bytes]:
        """Next message, or None after ``timeout`` seconds without one (or a
        wake-up without one).  ``spin``: seconds to look for a message before
        sleeping, when the previous call returned one (see the module).

        Raises :class:`RingClosed` once the writer closed and the ring is empty.
        """
        if self._closed:
            raise RingClosed("ring is closed")
        head = self._get(_HEAD)
        if head == self._get(_TAIL) and spin > 0 and self._active:
            self._active = False
            end = time.perf_counter() + spin
            yield_ = os.sched_yield
            while head == self._get(_TAIL) and time.perf_counter() < end:
                yield_()
        if head == self._get(_TAIL):
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if self._get(_CLOSED):
                    raise RingClosed("writer closed the ring")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                if not _wait(self._items, left):
                    return None
                if head != self._get(_TAIL):
                    break
                if self._woken:          # wake_reader(): let the caller look at its stop flag
                    self._woken = False
                    return None
                # a stale ring (messages already read without sleeping): sleep again
        # frames start 8-byte aligned and the capacity is a multiple of 8: the length never wraps
        n = _U32.unpack_from(self._mv, HEADER + head % self.capacity)[0]
        if n > self.capacity - 4:
            raise ValueError(f"corrupt ring {self.name}: message length {n}")
        data = self._copy_out(head + 4, n)
        self._put(_HEAD, head + (4 + n + 7) // 8 * 8)
        if self._get(_WAITING):
            _ring(self._space)
        self._active = True
        return data

    def close(self) -> None:
        """Release the mapping and the doorbells (the reader thread must have
        stopped; writers in other threads get RingClosed from now on)."""
        with self._wlock:
            if self._closed:
                return
            self._closed = True
        for fd in (self._items, self._space):
            try:
                os.close(fd)
            except OSError:
                pass
        self._mv.release()
        self.seg.close()
