"""POSIX shared-memory segments (posix_ipc + mmap), exposed as torch tensors.

Segments are created with mode 0600 under a random name ``/embr-<pid>-<hex>``.
The creator unlinks the name as soon as the peer has attached (or on close),
so nothing stays in ``/dev/shm`` after a clean run; a process-exit hook unlinks
whatever a crashed handshake left behind.
"""

from __future__ import annotations

import atexit
import mmap
import os
import secrets
import threading

import posix_ipc
import torch

PREFIX = "/embr-"

_created: set[str] = set()
_created_lock = threading.Lock()


def new_name(tag: str = "") -> str:
    return f"{PREFIX}{os.getpid()}-{tag}{secrets.token_hex(6)}"


def _remember(name: str) -> None:
    with _created_lock:
        _created.add(name)


def _forget(name: str) -> None:
    with _created_lock:
        _created.discard(name)


def unlink_segment(name: str) -> bool:
    """Unlink a shared-memory name; returns False if it was already gone."""
    _forget(name)
    try:
        posix_ipc.unlink_shared_memory(name)
        return True
    except posix_ipc.ExistentialError:
        return False


def unlink_semaphore(name: str) -> bool:
    _forget(name)
    try:
        posix_ipc.unlink_semaphore(name)
        return True
    except posix_ipc.ExistentialError:
        return False


@atexit.register
def _cleanup_at_exit() -> None:  # pragma: no cover - exercised by crash tests
    with _created_lock:
        names = list(_created)
    for n in names:
        unlink_segment(n)
        unlink_semaphore(n)


def remember_semaphore(name: str) -> None:
    _remember(name)


def _prefault(mm: mmap.mmap, raw: torch.Tensor) -> None:
    advice = getattr(mmap, "MADV_POPULATE_WRITE", None)
    if advice is not None:
        try:
            mm.madvise(advice)
            return
        except OSError:
            pass
    raw.zero_()


class ShmSegment:
    """A mapped POSIX shared-memory segment; ``raw`` is a uint8 tensor over it."""

    def __init__(self, name: str, mm: mmap.mmap, size: int, owner: bool):
        self.name = name
        self.size = size
        self.owner = owner
        self._mm = mm
        self.raw = torch.frombuffer(mm, dtype=torch.uint8, count=size) if size else torch.empty(0, dtype=torch.uint8)
        self.unlinked = False

    @classmethod
    def create(cls, size: int, *, tag: str = "", prefault: bool = True) -> "ShmSegment":
        if size <= 0:
            raise ValueError("segment size must be positive")
        name = new_name(tag)
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        _remember(name)
        try:
            mm = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()
        seg = cls(name, mm, size, owner=True)
        if prefault:
            _prefault(mm, seg.raw)
        return seg

    @classmethod
    def attach(cls, name: str, size: int, prefault: bool = False) -> "ShmSegment":
        if not isinstance(name, str) or not name.startswith(PREFIX):
            raise ValueError(f"not an embresume segment name: {name!r}")
        shm = posix_ipc.SharedMemory(name)
        try:
            if shm.size < size:
                raise ValueError(f"segment {name} has {shm.size} bytes, expected {size}")
            mm = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()
        seg = cls(name, mm, size, owner=False)
        if prefault:
            # map the (already allocated) pages now, not on the first write of a request
            advice = getattr(mmap, "MADV_POPULATE_WRITE", None)
            if advice is not None:
                try:
                    mm.madvise(advice)
                except OSError:
                    pass
        return seg

    def unlink(self) -> None:
        if self.owner and not self.unlinked:
            unlink_segment(self.name)
            self.unlinked = True

    def close(self) -> None:
        self.unlink()
        self.raw = torch.empty(0, dtype=torch.uint8)
        # no mm.close(): torch.frombuffer tensors keep the mmap object alive but
        # hold no buffer export, so an explicit close would unmap memory that live
        # views (a zero-copy result, an in-flight copy) still use.  The mapping
        # goes away with the last reference.
        self._mm = None


class ShmBacking:
    """Pool backing in POSIX shared memory (same-host CPU path)."""

    def __init__(self, segment: ShmSegment):
        self.segment = segment
        self.raw = segment.raw

    @classmethod
    def create(cls, nbytes: int, prefault: bool = True) -> "ShmBacking":
        return cls(ShmSegment.create(nbytes, tag="pool-", prefault=prefault))

    @classmethod
    def attach(cls, name: str, nbytes: int, prefault: bool = True) -> "ShmBacking":
        return cls(ShmSegment.attach(name, nbytes, prefault=prefault))

    def close(self) -> None:
        self.raw = torch.empty(0, dtype=torch.uint8)
        self.segment.close()
