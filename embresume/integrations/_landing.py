"""Where an engine's scheduler process lands received items for its workers.

One region per language engine: a sealed memfd (see :mod:`embresume.ipc.shm`)
created by the scheduler-side connector, mapped by every worker process of
that engine (one per tensor-parallel rank) through ``/proc/<pid>/fd/<fd>``
of the scheduler process (same user, same host: they are one engine)::

    scheduler process                                  worker process (per TP rank)
    -----------------                                  ----------------------------
    LanguageEndpoint.request(mm_hash)  -- the encoder writes the receive pool once per host
    result -> LandingRegion.alloc + copy (one host copy)
    descriptor() = (pid, fd, size)  --- connector metadata --->  LandingView.open(descriptor)
    pin(mm_hash) while loads are out                           view(offset, shape, dtype)
                                                               -> encoder_cache[mm_hash] (copy)
    unpin after every rank reported  <--- worker metadata ----

An item that arrived in one chunk (the default ``load_from_pool``) skips the landing copy:
its rows are one byte range of the scheduler's receive pool, itself a sealed memfd, and the
workers map that pool the same way (a :class:`LandingView` over its descriptor) and read the
rows there; the scheduler keeps the item's blocks lent until the loads are reported.

Items are contiguous byte ranges (first fit over a free list kept sorted and
coalesced, 4 KiB granularity).  Entries nobody has pinned are evicted least
recently used first when space is needed; a pinned entry is never moved or
reused.  Nothing here imports an engine.
"""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..ipc.shm import ShmSegment

ALIGN = 4096


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dt


@dataclass
class Entry:
    key: str
    offset: int
    nbytes: int
    shape: tuple
    dtype: str
    pins: int = 0


class LandingRegion:
    """The scheduler side: allocation, pins and LRU eviction of landed items."""

    def __init__(self, nbytes: int):
        nbytes = max(ALIGN, -(-int(nbytes) // ALIGN) * ALIGN)
        # prefault: the pages are allocated (fallocate) either way, but a copy into pages this
        # mapping has not touched yet takes a fault per 4 KiB page: 12 ms instead of 2 ms for a
        # 16.5 MB item on the bench machine, for every item of the region's first pass
        self.segment = ShmSegment.create(nbytes, tag="landing", prefault=True,
                                         what="the vLLM connector's landing region")
        self.size = nbytes
        self._free: list[tuple[int, int]] = [(0, nbytes)]    # (offset, length), sorted, coalesced
        self._entries: "OrderedDict[str, Entry]" = OrderedDict()   # LRU first
        self.used = 0
        self.evictions = 0

    def descriptor(self) -> tuple[int, int, int]:
        return os.getpid(), int(self.segment.fd), self.size

    # ------------------------------------------------------------ entries
    def get(self, key: str) -> Optional[Entry]:
        e = self._entries.get(key)
        if e is not None:
            self._entries.move_to_end(key)
        return e

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def alloc(self, key: str, shape: tuple, dtype: torch.dtype,
              evictable: Optional[Callable[[str], bool]] = None,
              on_evict: Optional[Callable[[str], None]] = None) -> Optional[Entry]:
        """An entry for ``key`` (replacing none: the key must be new), evicting
        unpinned entries (least recently used first; only those ``evictable``
        allows, when given; ``on_evict`` is told each) as needed; None when the
        others leave no room."""
        if key in self._entries:
            raise ValueError(f"{key!r} has landed already")
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        need = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        if need > self.size:
            return None
        while True:
            off = self._first_fit(need)
            if off is not None:
                break
            victim = next((e for e in self._entries.values()
                           if e.pins == 0 and (evictable is None or evictable(e.key))), None)
            if victim is None:
                return None
            self.discard(victim.key)
            self.evictions += 1
            if on_evict is not None:
                on_evict(victim.key)
        e = Entry(key, off, need, tuple(int(s) for s in shape), str(dtype).replace("torch.", ""))
        self._entries[key] = e
        self.used += need
        return e

    def tensor(self, e: Entry) -> torch.Tensor:
        return _view(self.segment.raw, e.offset, e.shape, e.dtype)

    def pin(self, key: str) -> None:
        self._entries[key].pins += 1

    def unpin(self, key: str) -> None:
        e = self._entries.get(key)
        if e is not None and e.pins > 0:
            e.pins -= 1

    def discard(self, key: str) -> None:
        e = self._entries.pop(key, None)
        if e is None:
            return
        self.used -= e.nbytes
        self._give_back(e.offset, e.nbytes)

    def pinned(self) -> int:
        return sum(1 for e in self._entries.values() if e.pins)

    def close(self) -> None:
        self._entries.clear()
        self.segment.close()

    # ------------------------------------------------------------ free list
    def _first_fit(self, need: int) -> Optional[int]:
        for i, (off, length) in enumerate(self._free):
            if length >= need:
                if length == need:
                    del self._free[i]
                else:
                    self._free[i] = (off + need, length - need)
                return off
        return None

    def _give_back(self, off: int, length: int) -> None:
        i = bisect.bisect_left(self._free, (off, 0))
        if i < len(self._free) and off + length == self._free[i][0]:
            length += self._free[i][1]
            del self._free[i]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == off:
            off, length = self._free[i - 1][0], self._free[i - 1][1] + length
            del self._free[i - 1]
            i -= 1
        self._free.insert(i, (off, length))


def _view(raw: torch.Tensor, offset: int, shape: tuple, dtype: str) -> torch.Tensor:
    dt = _dtype(dtype)
    n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dt).element_size()
    return raw[offset:offset + n].view(dt).view(shape)


class LandingView:
    """The worker side: the scheduler's region, mapped once per process."""

    def __init__(self, descriptor: tuple[int, int, int], prefault: bool = True):
        pid, fd, size = (int(x) for x in descriptor)
        path = f"/proc/{pid}/fd/{fd}"
        try:
            own = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, f"cannot open the scheduler's landing region {path}: {e.strerror} "
                                   "(the workers must run as the scheduler's user on its host)") from None
        try:
            # the worker's mapping populated once too, for reading (its scheduler's region: a
            # first read of each page would fault, 3.8 ms instead of 2.5 ms to read 16.5 MB on
            # the bench machine; 60 ms for 512 MiB once, at the worker's first load)
            self.segment = ShmSegment.from_fd(own, size, prefault=prefault, what="landing region")
        finally:
            os.close(own)
        self.descriptor = (pid, fd, size)

    def tensor(self, offset: int, shape: tuple, dtype: str) -> torch.Tensor:
        return _view(self.segment.raw, offset, shape, dtype)

    def close(self) -> None:
        self.segment.close()


#: what a consumer whose workers cannot map the landing region should do instead
USE_WORKER_RECEIVE = ("use receive='worker' (each worker receives its own copy into its own pool; "
                      "needs vLLM's V2 model runner)")


def dumpable() -> bool:
    """Whether this process is dumpable (``prctl(PR_GET_DUMPABLE)``): a process that is not
    (set by a security policy, a setuid start, or the process itself) keeps even its own
    user's other processes out of ``/proc/<pid>/fd``, so no worker could map its region."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(3, 0, 0, 0, 0) != 0       # PR_GET_DUMPABLE
    except (OSError, AttributeError):
        return True                                 # not Linux: nothing to tell


def check_scheduler_side() -> None:
    """Raises ``PermissionError`` with the remedy where the workers could not map this
    process's region (checked when the scheduler-side connector starts)."""
    if not dumpable():
        raise PermissionError(
            f"this scheduler process (pid {os.getpid()}) is not dumpable, so its workers cannot "
            f"open its landing region through /proc/{os.getpid()}/fd; {USE_WORKER_RECEIVE}")


def check_worker_side(scheduler_pid: int) -> None:
    """Raises ``PermissionError`` with the remedy where this worker cannot reach the
    scheduler process's fds (checked when the worker-side connector starts; the first
    landed item would otherwise fail inside the model runner)."""
    if scheduler_pid == os.getpid():
        return
    path = f"/proc/{scheduler_pid}/fd"
    try:
        os.listdir(path)
    except OSError as e:
        raise PermissionError(
            f"this worker (pid {os.getpid()}) cannot open {path} ({e.strerror}): the scheduler's landing "
            f"region would be out of its reach (another user, a ptrace policy such as "
            f"kernel.yama.ptrace_scope=3, a non-dumpable scheduler, or another host); "
            f"{USE_WORKER_RECEIVE}") from None
