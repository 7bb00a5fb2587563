"""Process helpers: children that never outlive their parent.

:func:`die_with_parent` is meant to be called first thing in a spawned child
(``multiprocessing`` 'spawn' target, a helper started with ``subprocess``):
on Linux it asks the kernel to SIGKILL the child when its parent dies
(``prctl(PR_SET_PDEATHSIG, SIGKILL)``), so ``kill -9`` of the parent leaves no
orphan behind.  It then checks that the parent is still the expected one: a
parent that died *before* the prctl would otherwise go unnoticed.

Caveat of PR_SET_PDEATHSIG: the signal fires when the *thread* that forked the
child exits, not the parent process.  Start long-lived children from the main
thread (or from a thread that lives as long as the child).

The ``multiprocessing`` resource tracker needs nothing: it exits when the
last write end of its pipe closes, i.e. when the parent and every child that
inherited the pipe are gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import weakref
from typing import Optional

from embresume.node import pid_alive

PR_SET_PDEATHSIG = 1

_libc = None


def _prctl_pdeathsig(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``; False where unavailable (not Linux)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return _libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        return False


def expected_parent() -> Optional[int]:
    """The pid of the process that started us, as multiprocessing recorded it
    (None when we were not started by multiprocessing)."""
    try:
        import multiprocessing
        parent = multiprocessing.parent_process()
    except Exception:  # pragma: no cover
        return None
    return parent.pid if parent is not None else None


def die_with_parent(expected_ppid: Optional[int] = None, sig: int = signal.SIGKILL) -> bool:
    """Make this process die (``sig``, default SIGKILL) when its parent dies.

    ``expected_ppid``: the parent's pid; by default the one multiprocessing
    recorded, else the current parent.  If the parent is already gone (we were
    re-parented to init or a subreaper) the process exits at once with status 1.
    Returns True when the kernel will deliver the signal (Linux), False where
    only the start-up check could be made.
    """
    if expected_ppid is None:
        expected_ppid = expected_parent() or os.getppid()
    armed = _prctl_pdeathsig(int(sig))
    if os.getppid() != expected_ppid:
        # the parent died between our fork and the prctl: nobody will signal us
        os._exit(1)
    return armed


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux, from /proc)."""
    out: list[int] = []
    read_any = False
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tasks = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
            read_any = True
        except OSError:
            continue
    if read_any:
        return sorted(set(out))
    # fallback without /proc/<pid>/task/*/children: scan every process's ppid
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        out.append(int(name))
            except (OSError, IndexError, ValueError):
                continue
    return sorted(out)


@contextlib.contextmanager
def sigint_ignored():
    """Children started inside this block ignore SIGINT for their whole life.

    A Ctrl-C at a terminal signals the whole foreground process group; the
    parent (demo, bench) handles it and stops its children itself, so a child
    must neither die on its own nor print a ``KeyboardInterrupt`` traceback.
    SIG_IGN survives the exec of a 'spawn' child, and Python leaves an ignored
    SIGINT ignored at start-up, so even the child's imports are covered.
    Only the main thread may change signal handlers: elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


_tracked: "weakref.WeakSet" = weakref.WeakSet()


def start_child(proc) -> None:
    """``proc.start()`` (a multiprocessing Process) with SIGINT ignored in the
    child (:func:`sigint_ignored`); the process is remembered for
    :func:`terminate_children`."""
    with sigint_ignored():
        proc.start()
    _tracked.add(proc)


def terminate_children(timeout: float = 5.0) -> None:
    """SIGTERM every live process started with :func:`start_child` and reap it
    (SIGKILL after ``timeout``): what an interrupted parent does before its
    ordinary clean-up, so that clean-up finds nothing busy."""
    procs = [p for p in list(_tracked) if p.is_alive()]
    for p in procs:
        try:
            p.terminate()
        except Exception:  # pragma: no cover - already gone
            pass
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join(timeout)


__all__ = ["die_with_parent", "expected_parent", "pid_alive", "children", "sigint_ignored", "start_child",
           "terminate_children"]
