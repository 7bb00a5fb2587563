"""Shared helpers of the benchmark: deterministic data, statistics, spawned
children with bounded waits, the machine description and the /dev/shm check.

Nothing big ever crosses a pipe: both processes build the same data from a
seed (:func:`make_data`) and the receiver verifies bit for bit against its own
copy.
"""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import platform
import queue
import sys
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch

#: integer dtype of the same width, for bit-exact comparisons of float tensors
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

GB = 1e9  # throughput is reported in GB/s (10^9 bytes per second) of embedding bytes


# ---------------------------------------------------------------- data
def bits_view(t: torch.Tensor) -> torch.Tensor:
    """The same bytes as an integer tensor, so equality is bit equality
    (NaN payloads, -0.0 and friends included)."""
    return t.view(_BITS[t.element_size()])


ROWS_PER_PIECE = 1024


def make_data(hidden: int, max_tokens: int, dtype: torch.dtype, seed: int = 0):
    """Deterministic ``(embeddings [max_tokens, hidden], fill_ids [max_tokens],
    mrope [3, max_tokens])``; the embeddings are random bit patterns.

    Built in pieces of ``ROWS_PER_PIECE`` rows, each from its own generator, so
    the first rows do not depend on ``max_tokens``: two processes that asked
    for different maxima still agree on every common row.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    ibits = _BITS[itemsize]
    info = torch.iinfo(ibits)
    emb = torch.empty((max_tokens, hidden), dtype=ibits)
    fill = torch.empty(max_tokens, dtype=torch.int32)
    mrope = torch.empty((3, max_tokens), dtype=torch.int32)
    g = torch.Generator()
    for piece, s in enumerate(range(0, max_tokens, ROWS_PER_PIECE)):
        n = min(ROWS_PER_PIECE, max_tokens - s)
        g.manual_seed(((seed * 1_000_003 + hidden) * 65_537 + piece) & 0x7FFF_FFFF_FFFF_FFFF)
        if n == ROWS_PER_PIECE:
            torch.randint(info.min, info.max, (n, hidden), generator=g, dtype=ibits, out=emb[s:s + n])
        else:  # the same stream as a full piece, cut short
            emb[s:s + n] = torch.randint(info.min, info.max, (ROWS_PER_PIECE, hidden), generator=g,
                                         dtype=ibits)[:n]
        f = torch.randint(0, 1 << 30, (ROWS_PER_PIECE,), generator=g, dtype=torch.int32)
        m = torch.randint(0, 1 << 20, (3, ROWS_PER_PIECE), generator=g, dtype=torch.int32)
        fill[s:s + n] = f[:n]
        mrope[:, s:s + n] = m[:, :n]
    return emb.view(dtype), fill, mrope


def mrope_delta_for(tokens: int) -> int:
    return (tokens * 31) % 1000 - 500


def slice_data(data, tokens: int):
    """The request of ``tokens`` tokens: contiguous views/copies of the first rows."""
    emb, fill, mrope = data
    return emb[:tokens], fill[:tokens], mrope[:, :tokens].contiguous(), mrope_delta_for(tokens)


def equal_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device != b.device:
        b = b.to(a.device)
    return bool(torch.equal(bits_view(a.contiguous()), bits_view(b.contiguous())))


def emb_bytes(tokens: int, hidden: int, dtype: torch.dtype) -> int:
    return tokens * hidden * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------- statistics
def percentile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(latencies: Sequence[float], nbytes: int) -> dict:
    p50 = percentile(latencies, 50)
    p99 = percentile(latencies, 99)
    return {
        "n": len(latencies),
        "p50_s": p50,
        "p99_s": p99,
        "mean_s": sum(latencies) / len(latencies) if latencies else float("nan"),
        "min_s": min(latencies) if latencies else float("nan"),
        "max_s": max(latencies) if latencies else float("nan"),
        "gbps_p50": nbytes / p50 / GB if latencies and p50 > 0 else float("nan"),
        "gbps_best": nbytes / min(latencies) / GB if latencies and min(latencies) > 0 else float("nan"),
    }


def repeats_for(nbytes: int, profile: dict) -> int:
    """More repeats for small messages, at least ``min_repeats``."""
    n = int(profile["target_bytes"] // max(1, nbytes))
    return max(profile["min_repeats"], min(profile["max_repeats"], n))


# ---------------------------------------------------------------- ports, shm
from embresume.harness import free_port  # noqa: E402,F401  (re-exported for the bench modules)
from embresume.procutil import PipeQueue  # noqa: E402


def shm_objects() -> set[str]:
    """embresume's POSIX shm segments and semaphores currently in /dev/shm."""
    return set(glob.glob("/dev/shm/embr-*")) | set(glob.glob("/dev/shm/sem.embr-*"))


# ---------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / (1 << 20), 2)
    except OSError:
        pass
    return None


def _version(mod: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:
        return None


def machine_description() -> dict:
    """What the numbers were measured on (no hostname, no user names)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count()
    d = {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": affinity,
        "memory_gib": _mem_total_gib(),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": _version("numpy"),
        "pyzmq": _version("pyzmq"),
        "mooncake": _version("mooncake-transfer-engine") or _version("mooncake-transfer-engine-non-cuda"),
        "cupy": _version("cupy-cuda12x") or _version("cupy-cuda13x") or _version("cupy"),
        "embresume": _version("embresume"),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        try:
            d["gpu"] = torch.cuda.get_device_name(0)
            d["cuda"] = torch.version.cuda
        except Exception as e:  # pragma: no cover - GPU machines only
            d["gpu"] = f"unknown ({e})"
    return d


# ---------------------------------------------------------------- children
class ChildError(RuntimeError):
    """A child process reported an error, died, or did not answer in time."""


def _parent_alive(ppid: int) -> bool:
    return os.getppid() == ppid


def serve(cmd_q, res_q, handler: Callable[..., Any], idle_timeout: float = 900.0) -> None:
    """Child main loop: ``handler(*cmd)`` for every command, answer on ``res_q``.

    Exits on ("exit",), when the parent disappears, or after ``idle_timeout``
    seconds without a command.  Every wait is bounded.
    """
    ppid = os.getppid()
    res_q.put(("ready", os.getpid()))
    idle = time.monotonic()
    while True:
        try:
            cmd = cmd_q.get(timeout=1.0)
        except queue.Empty:
            if not _parent_alive(ppid) or time.monotonic() - idle > idle_timeout:
                return
            continue
        idle = time.monotonic()
        if not cmd or cmd[0] == "exit":
            return
        try:
            out = handler(*cmd)
            res_q.put(("ok", out))
        except BaseException as e:  # report, never hang the parent
            res_q.put(("error", f"{type(e).__name__}: {e}", traceback.format_exc(limit=8)))


def _child_main(target, *args) -> None:
    """Entry of every bench child: first make sure it dies with the bench."""
    from embresume.procutil import die_with_parent
    die_with_parent()
    target(*args)


class Child:
    """A spawned child process driven over two queues with bounded waits.

    ``target(cmd_q, res_q, *args)`` must call :func:`serve` (or speak the same
    ("ready" | "ok" | "error", ...) replies).
    """

    def __init__(self, target, args: tuple = (), name: str = "bench-child", start_timeout: float = 90.0,
                 ctx=None, wait: bool = True):
        self.name = name
        self._ready = False
        ctx = ctx or mp.get_context("spawn")
        self.cmd_q = PipeQueue(ctx)   # no named semaphore: a killed bench leaves nothing in /dev/shm
        self.res_q = PipeQueue(ctx)
        self.proc = ctx.Process(target=_child_main, args=(target, self.cmd_q, self.res_q) + tuple(args), name=name,
                                daemon=True)
        from embresume.procutil import start_child
        start_child(self.proc)   # SIGINT ignored: a Ctrl-C is the bench's to handle, no child tracebacks
        if wait:
            self.wait_ready(start_timeout)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait for the child's "ready" (its imports done); closes it on failure."""
        if self._ready:
            return
        try:
            self.reply(timeout, expect="ready")
            self._ready = True
        except KeyboardInterrupt:
            self.close(timeout=0)     # interrupted: no waiting for a child still importing
            raise
        except BaseException:
            self.close()
            raise

    def reply(self, timeout: float, expect: str = "ok"):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildError(f"{self.name}: no answer within {timeout:.0f}s")
            try:
                msg = self.res_q.get(timeout=min(0.5, left))
            except queue.Empty:
                if not self.proc.is_alive():
                    raise ChildError(f"{self.name} exited with code {self.proc.exitcode}") from None
                continue
            if msg[0] == "error":
                raise ChildError(f"{self.name}: {msg[1]}\n{msg[2] if len(msg) > 2 else ''}".rstrip())
            if msg[0] != expect:
                raise ChildError(f"{self.name}: expected {expect!r}, got {msg[0]!r}")
            return msg[1] if len(msg) > 1 else None

    def send(self, *cmd) -> None:
        if not self.proc.is_alive():
            raise ChildError(f"{self.name} is not running (exit code {self.proc.exitcode})")
        self.cmd_q.put(cmd)

    def call(self, *cmd, timeout: float = 120.0):
        self.wait_ready()
        self.send(*cmd)
        return self.reply(timeout)

    def close(self, timeout: float = 10.0) -> None:
        try:
            if self.proc.is_alive():
                self.cmd_q.put(("exit",))
                self.proc.join(timeout)
        except Exception:
            pass
        finally:
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(5)
            if self.proc.is_alive():  # pragma: no cover - a wedged child
                self.proc.kill()
                self.proc.join(5)
            for q in (self.cmd_q, self.res_q):
                try:
                    q.cancel_join_thread()
                    q.close()
                except Exception:
                    pass

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
