"""POSIX shared-memory segments (posix_ipc + mmap), exposed as torch tensors.

Segments are created with mode 0600 under a random name
``/embr-<pid>.<pid namespace>-<tag><hex>``.
The creator unlinks the name as soon as the peer has attached (or on close),
so nothing stays in ``/dev/shm`` after a clean run; a process-exit hook unlinks
whatever a crashed handshake left behind, and :func:`sweep_stale_segments`
(run once per process before its first segment) removes the names of
processes that died without running it (``kill -9``).

A new segment's pages are reserved up front (``posix_fallocate``), after a
check of the free space in ``/dev/shm``: a pool that does not fit raises
:class:`~embresume.errors.ConfigError` naming the size, the free space and the
fix, and leaves nothing behind; a later write can never hit SIGBUS ("Bus
error") on a full tmpfs.
"""

from __future__ import annotations

import atexit
import errno
import logging
import mmap
import os
import secrets
import threading
import time

import posix_ipc
import torch

from embresume.errors import ConfigError
from embresume.node import pid_alive

log = logging.getLogger("embresume.shm")

PREFIX = "/embr-"
SHM_DIR = "/dev/shm"
#: set to 0 to turn the start-up sweep of dead processes' segments off
SWEEP_ENV = "EMBRESUME_SHM_SWEEP"

_created: set[str] = set()
_created_lock = threading.Lock()


def _pid_namespace() -> str:
    """Our pid namespace as a short hex id ("" where /proc does not say)."""
    try:
        link = os.readlink("/proc/self/ns/pid")          # "pid:[4026531836]"
        return format(int(link[link.index("[") + 1:-1]), "x")
    except (OSError, ValueError):
        return ""


_PIDNS = _pid_namespace()


def new_name(tag: str = "") -> str:
    """``/embr-<pid>.<pid namespace>-<tag><random>``: the creator is in the name,
    so :func:`sweep_stale_segments` can tell a dead creator's names from a live one's."""
    ns = f".{_PIDNS}" if _PIDNS else ""
    return f"{PREFIX}{os.getpid()}{ns}-{tag}{secrets.token_hex(6)}"


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


# ---------------------------------------------------------------- stale names
def creator_pid(entry: str):
    """The creator pid in a /dev/shm entry ``embr-<pid>[.<pidns>]-...`` or
    ``sem.embr-...``; None when it is not ours or its creator ran in another pid
    namespace (a container sharing /dev/shm: its pids mean nothing here)."""
    base = entry[4:] if entry.startswith("sem.") else entry
    if not base.startswith(PREFIX[1:]):
        return None
    creator, sep, _ = base[len(PREFIX) - 1:].partition("-")
    pid, dot, ns = creator.partition(".")
    if not sep or not pid.isdigit() or (dot and ns != _PIDNS):
        return None
    return int(pid)


def sweep_stale_segments(min_age: float = 10.0, shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink the shm segments and semaphores (``embr-<pid>.<ns>-*``,
    ``sem.embr-<pid>.<ns>-*``) of creator processes that no longer exist.

    Only entries owned by our uid, created in our pid namespace, whose pid is
    not alive and that are older than ``min_age`` seconds are touched (the age
    keeps a just-created name of a process we cannot see safe).  Returns the
    removed entries.  One ``listdir``; cheap when nothing is stale.
    """
    try:
        entries = os.listdir(shm_dir)
    except OSError:
        return []
    uid, me, now = os.getuid(), os.getpid(), time.time()
    removed, dead = [], {}
    for entry in entries:
        pid = creator_pid(entry)
        if pid is None or pid == me:
            continue
        if pid not in dead:
            dead[pid] = not pid_alive(pid)
        if not dead[pid]:
            continue
        path = os.path.join(shm_dir, entry)
        try:
            st = os.lstat(path)
            if st.st_uid != uid or now - st.st_mtime < min_age:
                continue
            os.unlink(path)
            removed.append(entry)
        except FileNotFoundError:
            continue
        except OSError as e:  # pragma: no cover - permissions, read-only /dev/shm
            log.debug("could not remove stale %s: %s", path, e)
    if removed:
        log.info("removed %d shared-memory name(s) left by dead processes: %s", len(removed),
                 ", ".join(sorted(removed)[:5]) + (" ..." if len(removed) > 5 else ""))
    return removed


_swept_pid = None


def _sweep_once() -> None:
    global _swept_pid
    if _swept_pid == os.getpid():
        return
    _swept_pid = os.getpid()
    if os.environ.get(SWEEP_ENV, "1").strip() in ("0", "false", "no", "off"):
        return
    try:
        sweep_stale_segments()
    except Exception as e:  # pragma: no cover - never let housekeeping break a start
        log.debug("sweep of stale segments failed: %s", e)


# ---------------------------------------------------------------- space
def shm_free_bytes(shm_dir: str = SHM_DIR):
    """(free bytes, total bytes) of the tmpfs behind POSIX shm, or None when unknown."""
    try:
        st = os.statvfs(shm_dir)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _fmt(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def no_space_message(size: int, what: str, free=None) -> str:
    """The error text for a segment of ``size`` bytes that does not fit in /dev/shm."""
    free = shm_free_bytes() if free is None else free
    have = (f"{SHM_DIR} has {_fmt(free[0])} free of {_fmt(free[1])}" if free
            else f"{SHM_DIR} has no room for it")
    fit = ""
    if free and (16 << 20) < free[0] < size:
        fit = f" (e.g. EMBRESUME_POOL_BYTES={max(1, int(free[0] * 0.8) >> 20)}M fits now)"
    return (f"{what} needs {_fmt(size)} ({size} bytes) of shared memory but {have}. "
            f"Make the pool smaller: Config(pool_bytes=...) / EMBRESUME_POOL_BYTES{fit}, fewer "
            f"cache_buffers (EMBRESUME_CACHE_BUFFERS) or a smaller hidden size; or give the machine a larger "
            f"{SHM_DIR}: docker run --shm-size=8g ..., or mount -o remount,size=8G {SHM_DIR}")


def _reserve(fd: int, size: int) -> None:
    """Give the shm object ``size`` bytes of real pages now (ENOSPC here, not SIGBUS later)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
            os.ftruncate(fd, size)  # no fallocate here: at least size it; the free-space check stands
        else:
            raise


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
    def create(cls, size: int, *, tag: str = "", prefault: bool = True,
               what: str = "") -> "ShmSegment":
        """A new segment of ``size`` bytes, its pages reserved.

        Raises :class:`ConfigError` (and leaves no name behind) when /dev/shm
        cannot hold it.
        """
        if size <= 0:
            raise ValueError("segment size must be positive")
        what = what or ("a control ring" if tag.startswith("ring") else "a shared-memory segment")
        _sweep_once()
        free = shm_free_bytes()
        if free is not None and free[0] < size:
            raise ConfigError(no_space_message(size, what, free))
        name = new_name(tag)
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600)
        _remember(name)
        try:
            try:
                _reserve(shm.fd, size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                    raise ConfigError(no_space_message(size, what)) from None
                raise
            mm = mmap.mmap(shm.fd, size)
        except BaseException:
            unlink_segment(name)
            raise
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
        free = shm_free_bytes()
        log.info("receive pool: %s in %s (%s free)", _fmt(nbytes), SHM_DIR, _fmt(free[0]) if free else "unknown")
        return cls(ShmSegment.create(nbytes, tag="pool-", prefault=prefault, what="the receive pool"))

    @classmethod
    def attach(cls, name: str, nbytes: int, prefault: bool = True) -> "ShmBacking":
        return cls(ShmSegment.attach(name, nbytes, prefault=prefault))

    def close(self) -> None:
        self.raw = torch.empty(0, dtype=torch.uint8)
        self.segment.close()
