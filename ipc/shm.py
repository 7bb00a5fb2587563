"""Anonymous shared memory: sealed memfds mapped as torch tensors.

Every segment embresume shares between processes (the receive pool, the
control rings) is a ``memfd`` with no name in any file system::

    creator                                   peer (after the Unix-socket handshake)
    -------                                   ----
    fd = memfd_create(MFD_ALLOW_SEALING)
    posix_fallocate(fd, 0, size)      # pages reserved now: ENOMEM here, never SIGBUS later
    fcntl(F_ADD_SEALS, SHRINK|GROW|SEAL)
    mmap(fd)                  ---- fd over SCM_RIGHTS ---->   ShmSegment.from_fd(fd, size)
                                                                check: a memfd, sealed SHRINK|GROW|SEAL,
                                                                at least ``size`` bytes
                                                              mmap(fd)

Sealed, the object can never shrink under a mapping, so no peer can make
the other side's accesses fault (``SIGBUS``) by truncating it; a peer's fd
that is not sealed that way is refused.  Nothing is named, so nothing stays
behind whatever way the processes end (``kill -9`` included): the memory goes
with the last fd and mapping.

The memory is charged like any shared memory to the machine and the
process's memory cgroup, not to the size of ``/dev/shm`` (Docker's 64 MiB
default does not apply).  Before creating a segment, its size is checked
against the memory available (``MemAvailable`` and the cgroup's
``memory.max``); a pool that does not fit raises
:class:`~embresume.errors.ConfigError` naming the size, what is available
and the fix.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
from typing import Optional

import torch

from embresume.errors import NoMemory

log = logging.getLogger("embresume.shm")

#: seals every shared segment carries, and every peer's segment must carry:
#: SHRINK (no truncation under our mapping: SIGBUS), GROW (its size is what we
#: checked) and SEAL (nobody can change the seals after we checked them)
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
REQUIRED_SEALS = SEALS


# ---------------------------------------------------------------- space
def _cgroup_room() -> Optional[int]:
    """Bytes left under this process's cgroup v2 ``memory.max`` (None: no limit or unknown)."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next((line.split(":", 2)[2].strip() for line in f if line.startswith("0::")), None)
        if path is None:
            return None
        base = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
        with open(os.path.join(base, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(base, "memory.current")) as f:
            used = int(f.read())
        return max(0, int(limit) - used)
    except (OSError, ValueError, StopIteration):
        return None


def memory_free_bytes() -> Optional[tuple[int, int]]:
    """(available bytes, total bytes) for new shared memory, or None when unknown:
    ``MemAvailable``/``MemTotal`` of /proc/meminfo, capped by the cgroup's limit."""
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemAvailable", "MemTotal"):
                    info[key] = int(rest.split()[0]) * 1024
        avail, total = info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        return None
    room = _cgroup_room()
    if room is not None:
        avail = min(avail, room)
    return avail, total


def _fmt(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def no_space_message(size: int, what: str, free=None) -> str:
    """The error text for a segment of ``size`` bytes that does not fit in memory."""
    free = memory_free_bytes() if free is None else free
    have = (f"this machine has {_fmt(free[0])} available of {_fmt(free[1])} (MemAvailable, "
            f"capped by the memory cgroup)" if free else "the machine has no memory for it")
    fit = ""
    if free and (16 << 20) < free[0] < size:
        fit = f" (e.g. EMBRESUME_POOL_BYTES={max(1, int(free[0] * 0.8) >> 20)}M fits now)"
    return (f"{what} needs {_fmt(size)} ({size} bytes) of shared memory but {have}. "
            f"Make the pool smaller: Config(pool_bytes=...) / EMBRESUME_POOL_BYTES{fit}, fewer "
            f"cache_buffers (EMBRESUME_CACHE_BUFFERS) or a smaller hidden size; or give the process "
            f"more memory (a higher memory limit of its container)")


def _reserve(fd: int, size: int) -> None:
    """Give the object ``size`` bytes of real pages now (ENOSPC/ENOMEM here, not SIGBUS later)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
            os.ftruncate(fd, size)  # no fallocate here: at least size it; the free-memory check stands
        else:
            raise


#: madvise(2) advice of Linux 5.14 (Python's mmap module names them from 3.13 on only:
#: without these values a prefault here was a no-op on 3.11/3.12)
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def _populate(mm: mmap.mmap, write: bool = True) -> bool:
    """Fault every page of ``mm`` into this mapping now (page tables; the pages of a
    fallocated memfd exist already), writable or for reading; False where the kernel
    cannot (before 5.14: EINVAL).  A first touch of a page through a mapping costs a
    fault per 4 KiB: copying 16.5 MB into pages this mapping had not touched took 12 ms
    instead of 2 ms on the 2-core bench machine."""
    if not hasattr(mm, "madvise"):                  # pragma: no cover - not Linux
        return False
    try:
        mm.madvise(MADV_POPULATE_WRITE if write else MADV_POPULATE_READ)
        return True
    except OSError:
        return False


def check_sealed(fd: int, size: int, what: str = "segment") -> int:
    """Raise ValueError unless ``fd`` is a memfd sealed against shrinking,
    growing and further sealing (``REQUIRED_SEALS``) that holds at least
    ``size`` bytes; returns its size."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        raise ValueError(f"the peer's {what} is not a sealable memfd ({e.strerror})") from None
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise ValueError(f"the peer's {what} is not sealed against shrinking, growing and resealing "
                         f"(seals 0x{seals:x}, required 0x{REQUIRED_SEALS:x}): it could be truncated under "
                         "our mapping")
    have = os.fstat(fd).st_size
    if have < size:
        raise ValueError(f"the peer's {what} has {have} bytes, expected at least {size}")
    return have


class ShmSegment:
    """A mapped shared segment; ``raw`` is a uint8 tensor over it.

    The creator keeps the memfd open (``fd``) to hand it to peers; a segment
    opened from a peer's fd keeps only the mapping."""

    def __init__(self, mm: mmap.mmap, size: int, fd: Optional[int], owner: bool, tag: str = ""):
        self.size = size
        self.owner = owner
        self.fd = fd
        self.tag = tag
        self._mm = mm
        self.raw = torch.frombuffer(mm, dtype=torch.uint8, count=size) if size else torch.empty(0, dtype=torch.uint8)

    @property
    def name(self) -> str:
        """A label for logs (segments have no name in any file system)."""
        return f"memfd:{self.tag or 'segment'}@{os.getpid()}"

    @classmethod
    def create(cls, size: int, *, tag: str = "", prefault: bool = True, what: str = "") -> "ShmSegment":
        """A new sealed segment of ``size`` bytes, its pages reserved.

        Raises :class:`ConfigError` when the machine cannot hold it.
        """
        if size <= 0:
            raise ValueError("segment size must be positive")
        what = what or ("a control ring" if tag.startswith("ring") else "a shared-memory segment")
        free = memory_free_bytes()
        if free is not None and free[0] < size:
            raise NoMemory(no_space_message(size, what, free))
        fd = os.memfd_create(f"embresume-{tag or 'seg'}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            try:
                _reserve(fd, size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                    raise NoMemory(no_space_message(size, what)) from None
                raise
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        seg = cls(mm, size, fd, owner=True, tag=tag)
        if prefault and not _populate(mm):
            seg.raw.zero_()
        return seg

    @classmethod
    def from_fd(cls, fd: int, size: int, *, prefault: bool = False, what: str = "segment") -> "ShmSegment":
        """Map ``size`` bytes of a peer's segment.  The caller keeps (and closes) ``fd``.

        ``prefault`` maps its pages now, for reading (a segment this process only reads:
        a worker's view of its own scheduler's region).  Never for an untrusted peer's
        segment: pages the peer left unallocated would be allocated (and charged) here,
        and a large segment would hold up the calling thread.

        Raises ValueError when the fd is not a memfd sealed SHRINK|GROW|SEAL
        or is smaller than ``size``."""
        if size <= 0:
            raise ValueError(f"{what} size must be positive")
        check_sealed(fd, size, what)
        mm = mmap.mmap(fd, size)
        seg = cls(mm, size, None, owner=False, tag=what)
        if prefault:
            _populate(mm, write=False)
        return seg

    def close(self) -> None:
        self.raw = torch.empty(0, dtype=torch.uint8)
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        # no mm.close(): torch.frombuffer tensors keep the mmap object alive but
        # hold no buffer export, so an explicit close would unmap memory that live
        # views (a zero-copy result, an in-flight copy) still use.  The mapping
        # goes away with the last reference.
        self._mm = None


class ShmBacking:
    """Pool backing in anonymous shared memory (same-host CPU path)."""

    def __init__(self, segment: ShmSegment):
        self.segment = segment
        self.raw = segment.raw

    @classmethod
    def create(cls, nbytes: int, prefault: bool = True) -> "ShmBacking":
        free = memory_free_bytes()
        log.info("receive pool: %s of shared memory (%s available)", _fmt(nbytes),
                 _fmt(free[0]) if free else "unknown")
        return cls(ShmSegment.create(nbytes, tag="pool", prefault=prefault, what="the receive pool"))

    @classmethod
    def from_fd(cls, fd: int, nbytes: int, prefault: bool = False) -> "ShmBacking":
        """A peer's pool (the encoder maps each language endpoint's): not prefaulted by
        default, see :meth:`ShmSegment.from_fd`."""
        return cls(ShmSegment.from_fd(fd, nbytes, prefault=prefault, what="receive pool"))

    def close(self) -> None:
        self.raw = torch.empty(0, dtype=torch.uint8)
        self.segment.close()
