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

:class:`PipeQueue` is the queue to talk to such a child: ``multiprocessing``'s
``Queue`` (and ``Lock``, ``Semaphore``) are POSIX named semaphores,
``/dev/shm/sem.mp-*``, which nobody unlinks when the whole process group is
SIGKILLed (the resource tracker that would dies with it).  A pipe leaves nothing.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import os
import queue
import signal
import sys
import threading
import time
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
    The main thread also blocks SIGINT for the block: a signal that is blocked
    is not ignored but kept pending, so a Ctrl-C while the child starts reaches
    the parent's own handler when the block ends instead of being dropped (it
    was: a bench interrupted one second in, while it started its encoder, ran to
    its end).  A Ctrl-C that the kernel hands to another thread of the parent
    meanwhile is still ignored.  Only the main thread may change signal
    handlers: elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class Terminated(KeyboardInterrupt):
    """A SIGTERM, raised in the main thread inside :func:`sigterm_interrupts`.

    A KeyboardInterrupt, so that everything that cleans up after a Ctrl-C (the
    harness's children, the demo's endpoints, the bench's processes) cleans up
    after a SIGTERM the same way; the command line tells them apart (exit 143, not 130).
    """


class _SigtermState:
    def __init__(self) -> None:
        self.hit = False

    def handler(self, signum, frame) -> None:
        if not self.hit:        # the first SIGTERM stops the work; more are ignored while it cleans up
            self.hit = True
            raise Terminated()


@contextlib.contextmanager
def sigterm_interrupts():
    """Within the block a SIGTERM raises :class:`Terminated` in the main thread
    (once: later ones are ignored while the clean-up runs) instead of killing the
    process before its ``finally`` blocks and exit handlers run.  Yields an object
    whose ``hit`` says whether one came.  Only the main thread may change signal
    handlers: elsewhere this does nothing."""
    state = _SigtermState()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    old = signal.signal(signal.SIGTERM, state.handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, old)


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


_CLOSE = object()   # the feeder's "flush and stop"


class PipeQueue:
    """A one-way queue between two processes over a ``multiprocessing`` Pipe,
    with no named semaphore: nothing in /dev/shm, whatever kills the processes.

    For the usual parent/child pair: one process puts (from any of its threads),
    the other gets.  Like ``multiprocessing.Queue``: ``put`` never blocks (a
    feeder thread writes to the pipe), what was put is flushed when the process
    exits normally (for at most ``flush_timeout`` seconds, unless
    :meth:`cancel_join_thread`), ``get(timeout=...)`` raises ``queue.Empty``,
    and the object is passed to a spawned child as a Process argument.  Unlike
    it, an object that cannot be pickled raises in ``put`` itself.  After
    :meth:`close` this process neither puts nor gets.
    """

    def __init__(self, ctx=None, flush_timeout: float = 5.0):
        import multiprocessing
        self._reader, self._writer = (ctx or multiprocessing).Pipe(duplex=False)
        self._flush_timeout = flush_timeout
        self._reset()
        from multiprocessing.util import register_after_fork
        register_after_fork(self, PipeQueue._reset)

    def __getstate__(self):
        from multiprocessing import context
        context.assert_spawning(self)
        return self._reader, self._writer, self._flush_timeout

    def __setstate__(self, state) -> None:
        self._reader, self._writer, self._flush_timeout = state
        self._reset()

    def _reset(self) -> None:
        self._rlock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._buffer: collections.deque = collections.deque()
        self._thread: Optional[threading.Thread] = None
        self._join = None
        self._join_cancelled = False
        self._closed = False

    def put(self, obj) -> None:
        from multiprocessing.reduction import ForkingPickler
        if self._closed:
            raise ValueError("PipeQueue is closed")
        data = bytes(ForkingPickler.dumps(obj))
        with self._cond:
            if self._thread is None:
                self._start_feeder()
            self._buffer.append(data)
            self._cond.notify()

    def get(self, block: bool = True, timeout: Optional[float] = None):
        from multiprocessing.reduction import ForkingPickler
        if self._closed:
            raise ValueError("PipeQueue is closed")
        if not block:
            timeout = 0.0
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        if not self._rlock.acquire(timeout=-1 if deadline is None else max(0.0, timeout)):
            raise queue.Empty
        try:
            if deadline is not None and not self._reader.poll(max(0.0, deadline - time.monotonic())):
                raise queue.Empty
            data = self._reader.recv_bytes()
        finally:
            self._rlock.release()
        return ForkingPickler.loads(data)

    def get_nowait(self):
        return self.get(False)

    def empty(self) -> bool:
        return not self._reader.poll()

    def _start_feeder(self) -> None:
        from multiprocessing.util import Finalize
        t = threading.Thread(target=PipeQueue._feed, args=(self._buffer, self._cond, self._writer),
                             name="PipeQueueFeeder", daemon=True)
        t.start()
        self._thread = t
        if not self._join_cancelled:
            # at exit (multiprocessing's, also a spawned child's): what was put reaches the pipe
            self._join = Finalize(t, PipeQueue._finalize_join, [weakref.ref(t), self._flush_timeout],
                                  exitpriority=-5)
        Finalize(self, PipeQueue._finalize_close, [self._buffer, self._cond], exitpriority=10)

    @staticmethod
    def _feed(buffer, cond, writer) -> None:
        try:
            while True:
                with cond:
                    while not buffer:
                        cond.wait()
                    data = buffer.popleft()
                if data is _CLOSE:
                    return
                writer.send_bytes(data)
        except OSError:   # nobody reads any more (the other process is gone): drop the rest
            pass
        finally:
            writer.close()

    @staticmethod
    def _finalize_close(buffer, cond) -> None:
        with cond:
            buffer.append(_CLOSE)
            cond.notify()

    @staticmethod
    def _finalize_join(twr, timeout: float) -> None:
        t = twr()
        if t is not None:
            t.join(timeout)

    def close(self) -> None:
        """No more puts or gets from this process; what was put is still sent."""
        if self._closed:
            return
        self._closed = True
        with self._cond:
            if self._thread is not None:
                self._buffer.append(_CLOSE)   # the feeder closes the writer when done
                self._cond.notify()
            else:
                self._writer.close()
        self._reader.close()

    def join_thread(self) -> None:
        """Wait (at most ``flush_timeout``) until what was put is in the pipe; after :meth:`close`."""
        assert self._closed, "PipeQueue not closed"
        if self._join is not None:
            self._join()

    def cancel_join_thread(self) -> None:
        """Do not wait for the feeder at exit (the reader may be gone)."""
        self._join_cancelled = True
        if self._join is not None:
            self._join.cancel()
            self._join = None


__all__ = ["PipeQueue", "Terminated", "die_with_parent", "expected_parent", "pid_alive", "children", "sigint_ignored",
           "sigterm_interrupts", "start_child", "terminate_children"]
