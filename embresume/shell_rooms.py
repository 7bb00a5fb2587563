"""The language endpoint's own per-room table: what the I/O shell keeps for each request.

The room machine (:class:`~embresume.rooms.language.LanguageRooms`) keeps a
request's state in its record (:class:`~embresume.rooms.language.Req`), and
only the machine changes that record.  What the endpoint needs beside it is
kept here, in one entry per room (:class:`RoomIO`): the merge buffer its
copies gather into, the result it hands out, the latch its waiters block on,
and the machine's record it belongs to (read, never written).

The endpoint changes the table under its lock, as the machine's actions and
the application's calls say: :meth:`ShellRooms.add` when the machine took a
request, :meth:`ShellRooms.drop` when the request was collected or
forgotten (the machine dropped its record in the same event), and the
entry's buffers when a :class:`~embresume.rooms.language.Copy`,
``Complete``, ``ZeroCopy``, ``Discard`` or ``Notify`` says so.  A request
collected while a copy of it still runs keeps its entry, out of the room's
slot, until the copy's ``Discard`` (its merge buffer is dropped then).
:meth:`ShellRooms.get` is a plain dict read, so ``poll`` never takes the lock.
"""

from __future__ import annotations

import _thread
import collections
from typing import Optional

from .errors import UnknownRoom
from .merge import EmbeddingResult, MergeBuffer


class Latch:
    """A one-shot event on one bare lock: ``set`` is one release, a waiter one
    acquire (threading.Event goes through a Condition: a fresh waiter lock per
    wait, a notify loop per set)."""

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()
        self._set = False

    def set(self) -> None:
        if not self._set:
            self._set = True
            try:
                self._lock.release()
            except RuntimeError:        # a concurrent set() released it first
                pass

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: Optional[float] = None) -> bool:
        if self._set:
            return True
        if self._lock.acquire(True, -1 if timeout is None else max(0.0, timeout)):
            try:
                self._lock.release()    # let the next waiter through
            except RuntimeError:
                pass
            return True
        return self._set


class RoomIO:
    """The endpoint's part of one request: ``req`` (the machine's record, read
    only), ``merge`` (the buffer its copies gather into, until it becomes the
    result or is discarded), ``result`` (the merged or zero-copy result, until
    collected) and ``latch`` (set when the request is terminal)."""

    __slots__ = ("req", "merge", "result", "latch")

    def __init__(self, req) -> None:
        self.req = req
        self.merge: Optional[MergeBuffer] = None
        self.result: Optional[EmbeddingResult] = None
        self.latch = Latch()


class FinishedRooms:
    """The rooms whose request reached Success or Failed, recorded for
    :meth:`~embresume.language.LanguageEndpoint.take_finished` once
    :meth:`track` was called (a caller with many open requests reads what
    changed instead of polling each one).  The endpoint records them
    (:meth:`add`) under its lock when it wakes their waiters; :meth:`pending`
    and :meth:`take` take no lock."""

    __slots__ = ("_q",)

    def __init__(self) -> None:
        self._q: Optional[collections.deque] = None     # None: not recorded

    def track(self) -> None:
        if self._q is None:
            self._q = collections.deque()

    def add(self, rooms: list) -> None:
        if self._q is not None:
            self._q.extend(rooms)

    def pending(self) -> bool:
        return bool(self._q)

    def take(self) -> list:
        """The rooms recorded since the last call, in order (a room requested
        again can come again); empty unless :meth:`track` was called.  What is
        recorded is bounded by the requests made."""
        q = self._q
        if not q:
            return []
        out = []
        try:
            while True:
                out.append(q.popleft())
        except IndexError:
            return out


class ShellRooms:
    """room -> :class:`RoomIO`, the endpoint's own table (see the module docstring)."""

    __slots__ = ("_rooms", "_retired")

    def __init__(self) -> None:
        self._rooms: dict = {}
        #: machine record -> the entry of a request collected while a copy of it ran (until its Discard)
        self._retired: dict = {}

    def add(self, req) -> RoomIO:
        """The machine took a request: its entry replaces the room's last one
        (which the machine let go of: collected, or failed and asked again)."""
        e = self._rooms[req.room] = RoomIO(req)
        return e

    def get(self, room) -> Optional[RoomIO]:
        return self._rooms.get(room)

    def need(self, room) -> RoomIO:
        e = self._rooms.get(room)
        if e is None:
            raise UnknownRoom(f"room {room!r} is not requested on this endpoint")
        return e

    def of(self, req) -> Optional[RoomIO]:
        """The entry of the machine's record ``req`` (None once it is gone)."""
        e = self._rooms.get(req.room)
        if e is not None and e.req is req:
            return e
        return self._retired.get(req) if self._retired else None

    def drop(self, room) -> Optional[RoomIO]:
        """The request left the machine (collected or forgotten): its entry
        leaves the table, or waits aside while a copy of it still runs."""
        e = self._rooms.pop(room, None)
        if e is not None and e.req.copying:
            self._retired[e.req] = e
        return e

    def discard(self, req) -> None:
        """The request failed: drop its merge buffer (``Discard``)."""
        e = self.of(req)
        if e is None:
            return
        self._retired.pop(req, None)
        if e.merge is not None:
            e.merge.discard()
            e.merge = None

    def __contains__(self, room) -> bool:
        return room in self._rooms

    def items(self):
        return self._rooms.items()

    def values(self):
        return self._rooms.values()
