"""Cross-host transport over the Mooncake Transfer Engine (RDMA; TCP in tests).

The language rank exports its receive pool (one registration of the pool's
whole backing allocation); the encoder opens that description and pushes each
chunk with **one** ``batch_transfer_sync_write`` of (src, dst, length)
triples -- embeddings rows, fill_ids, the three mrope rows of every block and,
on the first chunk only, the aux record.  Adjacent ranges are coalesced.

Security
--------
Every Mooncake engine listens on **two TCP ports on all interfaces**
(``0.0.0.0``: the P2P handshake/RPC port returned by ``get_rpc_port()`` and the
TCP data port) **without any authentication**.  Whoever can reach them can
read and write every memory region registered with that engine: on the
language side the receive pool, on the encoder side its source pools and the
transport's staging buffers.  Run it only on a trusted network (firewall the
port range, e.g. with ``MC_MIN_RPC_PORT``/``MC_MAX_RPC_PORT``), and call
:meth:`MooncakeTransport.close` so that nothing stays registered.

Behaviour of mooncake-transfer-engine 0.3.13 this module works around
---------------------------------------------------------------------
* ``initialize(local_hostname, metadata_server, protocol, device_name)`` takes
  positional arguments; we use ``metadata_server="P2PHANDSHAKE"`` (no
  metadata server); the peer's session id is ``host:get_rpc_port()``.  Any call
  on an engine that was never initialised segfaults, so engines are only ever
  created by :func:`_new_engine`, which initialises them and checks the code.
  ``initialize`` accepts an unknown protocol name and returns 0, so the
  protocol is validated here.
* ``MC_LOG_LEVEL`` is read once, when mooncake is first imported:
  :func:`import_mooncake` sets it (explicit argument, else
  ``EMBRESUME_MOONCAKE_LOG_LEVEL``, else an existing ``MC_LOG_LEVEL``, else
  ``ERROR``) before importing.
* ``protocol="rdma"`` on a host without an RDMA device silently falls back to
  TCP; we detect it (no ``/sys/class/infiniband`` device) and log one warning.
  :func:`mooncake_diagnostics` reports it for ``embresume doctor``.
* A dead peer (connection refused) fails in well under a millisecond, but a
  peer that accepts the TCP connection and never answers blocks the **first**
  transfer to it for ~60 s while holding that engine's lock (measured:
  neither ``MC_HANDSHAKE_CONNECT_TIMEOUT`` nor ``MC_TRANSFER_TIMEOUT`` shortens
  it).  Hence one engine **per peer session** (see :class:`MooncakeTransport`),
  :func:`probe_peer` / :meth:`MooncakeTransport.probe`, and the optional
  ``write_timeout``.
* Destroying an engine by dropping its last reference costs ~1.0 s (it joins
  its threads) **with the GIL held** (every Python thread stalls), and is unsafe
  while another thread is still inside a call on it (a hung write).  The
  engine's own ``TransferEngine::freeEngine()`` (an exported symbol of
  ``engine.so``, called through ctypes, which releases the GIL) does the same
  work -- closes both listening ports and joins both threads -- in ~1.0 s
  without stalling Python; the Python object's destructor is then instant.

Engine lifetime and bounds
--------------------------
Engines are only created by :func:`_new_engine` and kept alive by
``_all_engines`` plus an extra reference (``Py_IncRef``), so no destructor runs
by accident (nor at process exit).  Encoder-side engines are bounded per
process: at most ``MAX_PEER_ENGINES`` (64; per transport ``max_engines=`` or
``Config.extra["mooncake_max_engines"]``) exist outside the idle pool -- one per
open peer session, plus every engine abandoned after a hung call.  At the bound
:meth:`MooncakeTransport.open_peer` raises :class:`MooncakeEngineLimitError`
and creates nothing; a session already open reuses its engine and costs
nothing.  When a peer session's last pool is closed its engine is unregistered
and, when healthy (no hung call, no call in flight), returned to the idle pool
(``MAX_IDLE_ENGINES`` = 2 per protocol/devices/host) for the next peer; beyond
that it is really released: dropped from ``_all_engines`` and freed with
``freeEngine()`` by a daemon thread (at most ``_MAX_REAPERS`` at once), so
``close_peer`` stays fast and the engine's threads and 2 listening ports go
away ~1 s later; an ``atexit`` hook waits (bounded) for releases in progress.  Where
the installed build does not export ``freeEngine`` the engine stays idle instead
(still bounded by the peak number of peers).  Broken engines (a hung call) are
never recycled nor released and stay counted against the bound; export engines
(language side, one per transport) are kept idle, nothing registered, until
exit.

Measured on the 2-core development machine (loopback TCP; see
``bench/mooncake_bench.py`` for the transfer numbers):

* engine ``initialize``: 0.25-1.3 ms, +2 threads, +2 listening ports, <1 MiB RSS
  (+1 thread after its first transfer);
* engine release (``freeEngine`` on a reaper thread): 1.02 s each, Python
  threads keep running (4 reapers: 8 engines in 2.0 s); dropping the last
  reference instead: 1.02 s with the GIL held.  Ten peer sessions opened,
  written to and closed: 9 -> 40 threads and 2 -> 22 listening ports while
  open, 16 threads and 6 ports once released (2 idle engines kept);
* ``register_memory`` on TCP: 1-4 us at any size (16 MiB and 256 MiB alike;
  the very first registration of a process 0.15 ms), ``unregister_memory``
  1-13 us -- the TCP transport does not pin memory;
* each triple of a batch costs ~24-42 us on top of the bytes (1024 triples of
  16 bytes: 24 ms), which is why ranges are coalesced and why a full block's
  three mrope rows go as one range whenever the source allows it;
* the library's own work per ``write_chunk`` (validation, metadata staging,
  triples) is 20-35 us for 1024 tokens and 140-200 us for 32768 tokens, i.e.
  under 0.2 % of the transfer; end-to-end library/raw ratios measured 0.90-1.13
  (run-to-run noise of the loaded 2-core machine dominates).
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import ipaddress
import logging
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..blocks import BlockLayout, BlockPool
from ..errors import ConfigError, TransferError
from ..kernels.cpu import copy_tensor
from ..planner import ChunkPlan
from ..source import BlockSource, TensorSource
from .base import PeerPool, Transport

_LOG = logging.getLogger(__name__)

DESC_VERSION = 1
DEFAULT_LOG_LEVEL = "ERROR"
LOG_LEVELS = ("TRACE", "INFO", "WARNING", "ERROR")
PROTOCOLS = ("tcp", "rdma")
TENSOR_MODES = ("auto", "register", "stage")
METADATA_SERVER = "P2PHANDSHAKE"
_INFINIBAND_DIR = "/sys/class/infiniband"
#: encoder-side engines per process outside the idle pool (open peer sessions
#: plus engines abandoned after a hung call); per transport: ``max_engines``
MAX_PEER_ENGINES = 64
#: healthy idle encoder-side engines kept for reuse per (protocol, devices, host);
#: more are released (threads and listening ports closed)
MAX_IDLE_ENGINES = 2
_MAX_REAPERS = 4                  # engines released concurrently (~1 s each)
_EXIT_WAIT_S = 5.0                # atexit: longest wait for releases in progress
_FREE_ENGINE_SYMBOL = "_ZN8mooncake14TransferEngine10freeEngineEv"   # mooncake::TransferEngine::freeEngine()


class MooncakeDescError(TransferError, ValueError):
    """A peer's pool description is malformed or inconsistent."""


class MooncakeEngineLimitError(TransferError):
    """:meth:`MooncakeTransport.open_peer` refused a new peer session: the
    process already has the maximum number of encoder-side Mooncake engines."""


# ====================================================================== import
_import_lock = threading.Lock()
_mc_engine_mod = None
_import_error: Optional[BaseException] = None
_log_level_used: Optional[str] = None


def _resolve_log_level(log_level: Optional[str]) -> str:
    for value in (log_level, os.environ.get("EMBRESUME_MOONCAKE_LOG_LEVEL"), os.environ.get("MC_LOG_LEVEL")):
        if value is None or str(value).strip() == "":
            continue
        v = str(value).strip().upper()
        if v not in LOG_LEVELS:
            raise ConfigError(f"Mooncake log level must be one of {LOG_LEVELS}, got {value!r}")
        return v
    return DEFAULT_LOG_LEVEL


def import_mooncake(log_level: Optional[str] = None):
    """Import ``mooncake.engine`` once, with ``MC_LOG_LEVEL`` set first.

    Raises :class:`TransferError` (with the import error as cause) when the
    package cannot be imported.  The log level only takes effect on the first
    import of mooncake in the process.
    """
    global _mc_engine_mod, _import_error, _log_level_used
    if _mc_engine_mod is not None:
        return _mc_engine_mod
    with _import_lock:
        if _mc_engine_mod is not None:
            return _mc_engine_mod
        level = _resolve_log_level(log_level)
        if "mooncake.engine" in sys.modules or "mooncake" in sys.modules:
            _LOG.debug("mooncake was imported before embresume; MC_LOG_LEVEL is what it was then")
            _log_level_used = os.environ.get("MC_LOG_LEVEL", "<unset>")
        else:
            os.environ["MC_LOG_LEVEL"] = level
            _log_level_used = level

        try:
            import mooncake.engine as mod  # noqa: WPS433 (lazy on purpose)
        except Exception as e:  # pragma: no cover - depends on the machine
            _import_error = e
            raise TransferError(
                "the Mooncake transport needs mooncake-transfer-engine (CUDA hosts) or "
                f"mooncake-transfer-engine-non-cuda (CPU hosts): {type(e).__name__}: {e}") from e
        if level == "ERROR" and _log_level_used == level:
            # Mooncake's glog prints E-level lines for conditions it recovers from
            # (a peer's segment not cached yet) that users read as errors: quiet by
            # default, shown at a verbose level.  Failures still reach the caller
            # as return codes.
            _silence_glog()
        _mc_engine_mod = mod
        return mod


def _silence_glog() -> None:
    """Mooncake sets glog's FLAGS_minloglevel from MC_LOG_LEVEL when it is
    imported (ERROR at most) and ignores GLOG_minloglevel: raise the flag to
    FATAL in the loaded libglog."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "libglog" in line and ".so" in line}
    except OSError:
        return
    for lib in libs:
        try:
            ctypes.c_int.in_dll(ctypes.CDLL(lib), "_ZN3fLI17FLAGS_minloglevelE").value = 3
        except (OSError, ValueError):
            pass


def mooncake_available() -> bool:
    try:
        import_mooncake()
        return True
    except TransferError:
        return False


def rdma_devices() -> list[str]:
    """Names of the RDMA devices of this host (``/sys/class/infiniband``)."""
    try:
        return sorted(os.listdir(_INFINIBAND_DIR))
    except OSError:
        return []


_rdma_warned = False


def _warn_rdma_fallback(device_names: str) -> None:
    global _rdma_warned
    if not rdma_devices() and not _rdma_warned:
        _rdma_warned = True
        _LOG.warning("mooncake protocol 'rdma' requested but this host has no RDMA device (%s is empty): "
                     "Mooncake silently falls back to TCP%s", _INFINIBAND_DIR,
                     f" (device_names={device_names!r} ignored)" if device_names else "")


def mooncake_diagnostics() -> dict:
    """What ``embresume doctor`` shows about Mooncake; starts no engine."""
    info: dict[str, Any] = {"available": False}
    try:
        from importlib import metadata
        for dist in ("mooncake-transfer-engine", "mooncake-transfer-engine-non-cuda"):
            try:
                info["package"] = dist
                info["version"] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                info.pop("package", None)
    except Exception:  # pragma: no cover
        pass
    try:
        mod = import_mooncake()
        info["available"] = True
        for flag in ("SUPPORT_CUDA", "SUPPORT_EFA", "SUPPORT_HIP", "SUPPORT_INTRA_NVLINK", "SUPPORT_MNNVL"):
            if hasattr(mod, flag):
                info[flag.lower()] = bool(getattr(mod, flag))
    except TransferError as e:
        info["error"] = str(e)
    devs = rdma_devices()
    info["rdma_devices"] = devs
    info["rdma_usable"] = bool(devs)
    if not devs:
        info["rdma_note"] = "no RDMA device: protocol 'rdma' silently falls back to TCP"
    info["log_level"] = _log_level_used or _resolve_log_level(None)
    with _engines_lock:
        info["engines_created"] = _engines_created
        info["engines_idle"] = sum(len(v) for v in _idle_engines.values())
        info["engines_live"] = _peer_engines_live
        info["engines_broken"] = _peer_engines_broken
        info["engines_releasing"] = len(_doomed) + _reapers
        info["engines_released"] = _engines_released
    info["max_peer_engines"] = MAX_PEER_ENGINES
    info["max_idle_engines"] = MAX_IDLE_ENGINES
    info["security"] = ("every engine listens on two TCP ports on all interfaces without authentication; "
                        "anyone reaching them can read/write its registered memory")
    return info


# ====================================================================== sessions
def parse_session(session: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` accepted); raises :class:`MooncakeDescError`."""
    if not isinstance(session, str) or ":" not in session:
        raise MooncakeDescError(f"Mooncake session must be 'host:port', got {session!r}")
    host, _, port_s = session.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() for c in host) or len(host) > 255:
        raise MooncakeDescError(f"Mooncake session {session!r} has a bad host part")
    try:
        port = int(port_s)
    except ValueError:
        raise MooncakeDescError(f"Mooncake session {session!r} has a non-numeric port") from None
    if not 1 <= port <= 65535:
        raise MooncakeDescError(f"Mooncake session {session!r}: port {port} out of range")
    return host, port


def probe_peer(session: str, timeout: float = 1.0) -> bool:
    """Bounded TCP connect to the peer's Mooncake RPC port.

    True when something accepts connections there.  It does **not** prove the
    peer will answer (a stopped process still has its listening socket
    accepted by the kernel); use it together with the control channel's
    heartbeat, or :meth:`MooncakeTransport.probe` which also waits for a
    Mooncake-level answer.
    """
    host, port = parse_session(session)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ====================================================================== engines
_engines_lock = threading.Lock()
_engines_created = 0
_engines_released = 0
_peer_engines_live = 0           # encoder-side engines outside the idle pool (bounded)
_peer_engines_broken = 0         # of those: abandoned after a hung call (never released)
_idle_engines: dict[tuple, list] = {}
_all_engines: list = []          # keeps every engine alive until it is released or the process exits
_doomed: collections.deque = collections.deque()   # engines waiting for a reaper
_reapers = 0                     # reaper threads running
_reapers_idle = threading.Condition(_engines_lock)
_free_fn: Any = None             # ctypes freeEngine, False when this build lacks it


def _engine_free_fn():
    """``mooncake::TransferEngine::freeEngine()`` of the loaded ``engine.so``
    through ctypes (which releases the GIL during the call), or None."""
    global _free_fn
    if _free_fn is None:
        fn: Any = False
        try:
            lib = ctypes.CDLL(import_mooncake().__file__)     # already loaded: the same handle
            fn = getattr(lib, _FREE_ENGINE_SYMBOL)
            fn.argtypes = [ctypes.c_void_p]
            fn.restype = ctypes.c_int
        except (AttributeError, OSError, TypeError, TransferError) as e:
            _LOG.info("this Mooncake build exports no freeEngine (%s): idle engines are kept, not released", e)
            fn = False
        _free_fn = fn
    return _free_fn or None


def _new_engine(protocol: str, device_names: str, local_host: str):
    """A fresh, initialised engine (recycled when one is idle)."""
    global _engines_created
    key = (protocol, device_names, local_host)
    with _engines_lock:
        idle = _idle_engines.get(key)
        if idle:
            return idle.pop()
    mod = import_mooncake()
    te = mod.TransferEngine()
    rc = te.initialize(local_host, METADATA_SERVER, protocol, device_names)
    with _engines_lock:
        _all_engines.append(te)
        _engines_created += 1
    # never let the destructor run by accident (see the module docstring): it
    # costs ~1 s with the GIL held and crashes if a thread is still inside a
    # hung call on the engine; _retire_engine releases idle ones deliberately.
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(te))
    if rc != 0:
        raise TransferError(f"Mooncake initialize({local_host!r}, {METADATA_SERVER!r}, {protocol!r}, "
                            f"{device_names!r}) failed with code {rc}")
    return te


def _reserve_peer_engine(limit: int, session: str) -> None:
    """Count one more encoder-side engine, or raise :class:`MooncakeEngineLimitError`."""
    global _peer_engines_live
    with _engines_lock:
        live, broken = _peer_engines_live, _peer_engines_broken
        if live >= limit:
            raise MooncakeEngineLimitError(
                f"refusing a Mooncake engine for peer session {session!r}: this process already has {live} "
                f"encoder-side Mooncake engines ({broken} of them abandoned after a hung call), the limit is "
                f"{limit} (each engine holds 2-3 threads and 2 TCP ports listening on all interfaces); close "
                f"peers that are gone, or raise the limit with MooncakeTransport(max_engines=N) or "
                f"Config.extra['mooncake_max_engines'] = N (default MAX_PEER_ENGINES = {MAX_PEER_ENGINES})")
        _peer_engines_live = live + 1


def _unreserve_peer_engine() -> None:
    global _peer_engines_live
    with _engines_lock:
        _peer_engines_live -= 1


def _abandon_engine() -> None:
    """A broken encoder-side engine left its sessions: it stays alive and counted."""
    global _peer_engines_broken
    with _engines_lock:
        _peer_engines_broken += 1


def _retire_engine(key: tuple, te, releasable: bool = True, counted: bool = True) -> None:
    """A healthy encoder-side engine with nothing registered and no call in
    flight left its last session: keep it idle for reuse, or release it beyond
    ``MAX_IDLE_ENGINES``.  ``counted``: it was reserved by :func:`_reserve_peer_engine`."""
    global _peer_engines_live, _reapers
    free = _engine_free_fn() if releasable else None
    with _engines_lock:
        if counted:
            _peer_engines_live -= 1
        idle = _idle_engines.setdefault(key, [])
        if free is None or len(idle) < MAX_IDLE_ENGINES:
            idle.append(te)
            return
        for i, e in enumerate(_all_engines):
            if e is te:
                del _all_engines[i]
                break
        _doomed.append(te)
        start = _reapers < _MAX_REAPERS
        if start:
            _reapers += 1
    del te
    if start:
        threading.Thread(target=_reap, args=(free,), name="mooncake-engine-release", daemon=True).start()


def _recycle_engine(key: tuple, te) -> None:
    """Hand an idle, healthy engine from :func:`_new_engine` (not counted
    against the bound; the benchmarks use it) to the idle pool."""
    _retire_engine(key, te, counted=False)


def _reap(free) -> None:
    """Release doomed engines until none is left (a daemon thread)."""
    global _reapers, _engines_released
    while True:
        with _engines_lock:
            if not _doomed:
                _reapers -= 1
                _reapers_idle.notify_all()
                return
            te = _doomed.popleft()
        t0 = time.monotonic()
        try:
            rc = free(te.get_engine_ptr())     # no GIL held: joins the engine's threads, closes its ports
        except BaseException as e:  # noqa: BLE001 - a daemon thread has nobody to raise to
            _LOG.warning("releasing a Mooncake engine failed: %s: %s", type(e).__name__, e)
            with _engines_lock:
                _all_engines.append(te)                  # keep it (and its extra reference) alive
            continue
        # undo _new_engine's extra reference: the destructor runs when ``te`` goes
        # (instant now that freeEngine did the work)
        ctypes.pythonapi.Py_DecRef(ctypes.py_object(te))
        del te
        with _engines_lock:
            _engines_released += 1
        _LOG.debug("released an idle Mooncake engine (rc %s) in %.3f s", rc, time.monotonic() - t0)


def _wait_released(timeout: float) -> bool:
    """Wait until no engine release is in progress; False on timeout."""
    deadline = time.monotonic() + timeout
    with _engines_lock:
        while _reapers or _doomed:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            _reapers_idle.wait(left)
    return True


# a release still running when the interpreter exits could crash the exit
atexit.register(_wait_released, _EXIT_WAIT_S)


def _location_of(t: torch.Tensor) -> str:
    if t.device.type == "cpu":
        return "*"
    if t.device.type == "cuda":
        mod = import_mooncake()
        if not getattr(mod, "SUPPORT_CUDA", False):
            raise TransferError("this Mooncake build cannot register CUDA memory "
                                "(install mooncake-transfer-engine, not the -non-cuda build)")
        return f"cuda:{t.device.index or 0}"
    raise TransferError(f"Mooncake cannot register memory on device {t.device}")


class _Job:
    __slots__ = ("fn", "done", "result", "exc")

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.done = threading.Event()
        self.result = None
        self.exc: Optional[BaseException] = None


class _Engine:
    """One initialised engine plus what this transport registered in it."""

    def __init__(self, te, key: tuple, recyclable: bool):
        self.te = te
        self.key = key
        self.recyclable = recyclable
        self.session = f"{_session_host(key[2])}:{te.get_rpc_port()}"
        self.regs: dict[int, int] = {}       # addr -> nbytes
        self.lock = threading.Lock()         # serialises writes (and staging use)
        self.refs = 0
        self.broken: Optional[str] = None
        self.retired = False                 # released: no longer this wrapper's engine
        self.inflight = 0                    # calls outside ``lock`` (probes) still inside Mooncake
        self._state = threading.Lock()       # guards retired / inflight
        self._q: Optional[queue.SimpleQueue] = None
        self._thread: Optional[threading.Thread] = None
        self._release_when_idle = False

    # -- registrations --------------------------------------------------
    def register(self, addr: int, nbytes: int, location: str = "*") -> None:
        if self.retired:
            raise TransferError("this Mooncake engine was released (its peer is closed)")
        if addr in self.regs:
            if self.regs[addr] >= nbytes:
                return
            self.unregister(addr)
        rc = self.te.register_memory(addr, nbytes, location)
        if rc != 0:
            raise TransferError(f"Mooncake register_memory(0x{addr:x}, {nbytes}) failed with code {rc}"
                                + (" (overlaps a registered region)" if rc == -7 else ""))
        self.regs[addr] = nbytes

    def unregister(self, addr: int) -> None:
        if self.regs.pop(addr, None) is not None:
            rc = self.te.unregister_memory(addr)
            if rc != 0:
                _LOG.warning("Mooncake unregister_memory(0x%x) returned %d", addr, rc)

    def covered(self, addr: int, nbytes: int) -> bool:
        end = addr + nbytes
        return any(a <= addr and end <= a + n for a, n in self.regs.items())

    def overlaps(self, addr: int, nbytes: int) -> bool:
        end = addr + nbytes
        return any(addr < a + n and a < end for a, n in self.regs.items())

    # -- calls with an optional deadline -------------------------------
    def call(self, fn: Callable[[], Any], timeout: Optional[float]):
        """Run ``fn`` (a call into the engine) with an optional deadline.

        With a deadline the call runs on this engine's worker thread; when it
        expires the engine is marked broken (it is stuck inside Mooncake, with
        its lock held) and :class:`TransferError` is raised.
        """
        if timeout is None:
            return fn()
        if self._thread is None:
            self._q = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._worker, name=f"mooncake-{self.session}", daemon=True)
            self._thread.start()
        job = _Job(fn)
        self._q.put(job)
        if not job.done.wait(timeout):
            self.broken = f"a Mooncake call to this peer did not return within {timeout:g} s"
            raise TransferError(self.broken)
        if job.exc is not None:
            raise job.exc
        return job.result

    def _worker(self) -> None:
        q = self._q
        while True:
            job = q.get()
            if job is None:
                return
            try:
                job.result = job.fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                job.exc = e
            job.done.set()
            if self.broken is not None and self._release_when_idle:
                self._release_now()
                return

    # -- end of life ----------------------------------------------------
    def release(self) -> None:
        """Unregister everything; recycle the engine when it is healthy.

        A broken engine is still inside a hung call: touching it now would
        block on its lock, so the worker unregisters once the call returned
        (Mooncake gives up after ~60 s) and the engine is never recycled.
        """
        if self.broken is not None and self._thread is not None and self._thread.is_alive():
            self._release_when_idle = True
            self._q.put(_Job(lambda: None))   # wakes the worker after the hung call
            return
        self._release_now()
        if self._q is not None:
            self._q.put(None)

    def _release_now(self) -> None:
        for addr in list(self.regs):
            self.unregister(addr)
        if not self.recyclable:
            return
        with self._state:
            if self.retired:
                return
            self.retired = True
            inflight = self.inflight
        if self.broken is None:
            te, self.te = self.te, None
            # a probe still inside Mooncake: recycle (harmless) but never free it
            _retire_engine(self.key, te, releasable=inflight == 0)
        else:
            _abandon_engine()


def _session_host(host: str) -> str:
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            return f"[{host}]"
    except ValueError:
        pass
    return host


# ====================================================================== peers
_LAYOUT_KEYS = ("emb_offset", "fill_offset", "mrope_offset", "aux_offset", "emb_block_bytes", "emb_row_bytes")


def _desc_geometry(layout: BlockLayout) -> dict:
    bs = layout.block_size
    return {
        "emb_offset": layout.emb_offset, "fill_offset": layout.fill_offset,
        "mrope_offset": layout.mrope_offset, "aux_offset": layout.aux_offset,
        "emb_block_bytes": layout.emb_block_bytes, "emb_row_bytes": layout.emb_row_bytes,
        "fill_block_bytes": bs * 4, "mrope_block_bytes": 3 * bs * 4, "mrope_row_bytes": bs * 4,
        "aux_record_bytes": layout.aux_ints * 4,
    }


@dataclass
class _Staging:
    """A registered CPU buffer of the transport (per peer), grown on demand."""

    tensor: Optional[torch.Tensor] = None
    addr: int = 0
    nbytes: int = 0

    def ensure(self, eng: _Engine, nbytes: int) -> int:
        if nbytes > self.nbytes:
            cap = 1 << max(16, (nbytes - 1).bit_length())
            if self.addr:
                eng.unregister(self.addr)
            self.tensor, self.addr, self.nbytes = None, 0, 0
            t = torch.zeros(cap, dtype=torch.uint8)      # zeros: pre-faulted, never faults on the hot path
            eng.register(t.data_ptr(), cap)
            self.tensor, self.addr, self.nbytes = t, t.data_ptr(), cap
        return self.addr


class MooncakePeer(PeerPool):
    """An opened description of a peer's pool: its session and addresses."""

    def __init__(self, layout: BlockLayout, desc: dict, session: str, base: int, nbytes: int, engine: _Engine,
                 transport: "MooncakeTransport"):
        super().__init__(layout, desc)
        self._transport = transport
        self.session = session
        self.base = base
        self.nbytes = nbytes
        self.engine = engine
        self.meta = _Staging()       # fill_ids / mrope / aux staging
        self.emb = _Staging()        # embeddings staging (stage mode only)
        self.closed = False
        L = layout
        self.emb_addr = base + L.emb_offset
        self.fill_addr = base + L.fill_offset
        self.mrope_addr = base + L.mrope_offset
        self.aux_addr = base + L.aux_offset

    def close(self) -> None:
        self._transport.close_peer(self)

    def __repr__(self) -> str:
        return f"MooncakePeer(session={self.session!r}, base=0x{self.base:x}, blocks={self.layout.num_blocks})"


def _int_field(desc: dict, key: str, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    if key not in desc:
        raise MooncakeDescError(f"Mooncake pool description lacks {key!r}")
    v = desc[key]
    if not isinstance(v, int) or isinstance(v, bool):
        raise MooncakeDescError(f"Mooncake pool description: {key!r} must be an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise MooncakeDescError(f"Mooncake pool description: {key}={v} is outside [{lo}, {hi}]")
    return v


# ====================================================================== transport
class MooncakeTransport(Transport):
    """Mooncake Transfer Engine transport (see the module docstring).

    Language side (target)::

        t = MooncakeTransport(protocol, device_names, local_host=<this host's IP>)
        desc = t.export_pool(pool)       # JSON-able; send it in the handshake
        ...                              # peers write into the pool
        t.unexport_pool(pool); t.close()

    Encoder side (initiator)::

        t = MooncakeTransport(protocol, device_names, local_host=<this host's IP>)
        t.register_source_pool(enc_pool)            # once, when sending BlockSources
        # BEFORE first contact: the peer must be known alive over the control
        # channel (it sent its handshake / a heartbeat just now) -- optionally
        # also probe_peer(desc["session"]) or t.probe(peer)
        peer = t.open_peer(desc)                    # once per peer pool
        t.write_chunk(peer, src, plan, aux)         # per chunk; raises TransferError
        t.close_peer(peer); t.close()

    **Liveness before first contact.**  The first write to a peer performs
    Mooncake's handshake; if the peer accepts TCP but never answers (a stopped
    or wedged process) that write blocks for ~60 s inside Mooncake while holding
    the engine's lock.  The caller must therefore check that the peer is alive
    over the control channel before the first ``write_chunk`` to it.
    :func:`probe_peer` does a bounded TCP connect; :meth:`probe` also waits
    (bounded) for a Mooncake-level answer and marks the peer broken if none comes.

    **One engine per peer session.**  Each distinct peer session gets its own
    engine, created lazily by :meth:`open_peer` (pools of the same session share
    it), so one stalled peer blocks only writes to itself.  Per engine (measured,
    TCP): 0.25-1.3 ms to initialise, 2 threads, 2 listening ports; registering
    a source pool or staging buffer costs 1-4 us regardless of size.  On RDMA a
    registration pins memory (one MR per engine), so an encoder serving P peer
    sessions registers its source pool P times -- use ``tensor_mode`` and few
    source pools accordingly.  At most ``max_engines`` (default
    ``MAX_PEER_ENGINES``) encoder-side engines exist per process outside the
    idle pool; beyond that :meth:`open_peer` raises
    :class:`MooncakeEngineLimitError`.  Engines are recycled when their peer is
    closed; healthy idle ones beyond ``MAX_IDLE_ENGINES`` are released in the
    background (see the module docstring).

    **Failed writes.**  When :meth:`write_chunk` raises (non-zero return, or the
    optional ``write_timeout`` expired) the destination blocks may still be
    written later by a transfer in flight: the caller must not reuse those
    blocks until the peer confirmed, or the connection was torn down.

    Sources:

    * ``BlockSource``: blocks of the encoder's own pool, which must be
      registered with the engine (:meth:`register_source_pool`, cached; done
      automatically on first use).  Zero copies.
    * ``TensorSource``: fill_ids and mrope (16 bytes per token) are always
      copied into a per-peer registered staging buffer laid out like the
      destination blocks, so a full block's three mrope rows go as one range.
      Embeddings: ``tensor_mode="register"`` registers the chunk's rows in place
      for the duration of the write (TCP: register + unregister 3-4 us at any
      size, vs 1.5 / 3 / 14 ms to copy 32 / 64 / 256 MiB on the development
      machine); ``"stage"`` copies them into a registered staging
      buffer, sized on demand and reused (one copy).  ``"auto"`` registers on
      TCP and stages on RDMA, where registering pins pages for every chunk (not
      measured here: no RDMA device on the development machine) and staging
      keeps the MR count constant; it also stages when the tensor is on a
      device this Mooncake build cannot register or overlaps a registered region.

    ``write_timeout`` (seconds, default None = no deadline): run each write on
    the engine's worker thread and raise :class:`TransferError` when it has not
    returned in time; the peer is then broken (further writes raise at once)
    and its engine is abandoned: never recycled nor released, and it stays
    counted against ``max_engines``.

    ``max_engines`` (default None = ``MAX_PEER_ENGINES``; from
    ``Config.extra["mooncake_max_engines"]`` in :meth:`create`): the bound
    :meth:`open_peer` applies to the process's encoder-side engines.
    """

    name = "mooncake"
    same_host_only = False
    pool_devices = ("cpu", "cuda")

    # ------------------------------------------------------------- discovery
    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        try:
            import_mooncake()
        except TransferError as e:
            return str(e)
        return None

    @staticmethod
    def _local_host(config, peer_host: Optional[str]) -> str:
        from .select import local_ip_towards
        return config.mooncake_host or local_ip_towards(peer_host or "127.0.0.1")

    @classmethod
    def instance_key(cls, config, peer_host: Optional[str]):
        # one instance (one export engine, one registration of the pool) per
        # local interface the peers are reached through
        return (cls.name, cls._local_host(config, peer_host))

    @classmethod
    def create(cls, config, peer_host: Optional[str]) -> "MooncakeTransport":
        return cls.from_config(config, local_host=cls._local_host(config, peer_host),
                               write_timeout=config.extra.get("mooncake_write_timeout"),
                               max_engines=config.extra.get("mooncake_max_engines"))

    @classmethod
    def peer_host(cls, desc: dict) -> Optional[str]:
        try:
            return parse_session(desc.get("session"))[0]
        except (MooncakeDescError, AttributeError):
            return None

    def can_export(self, pool: BlockPool) -> bool:
        try:
            _location_of(pool.backing.raw)
        except TransferError:
            return False
        return True

    def __init__(self, protocol: str = "tcp", device_names: str = "", local_host: str = "127.0.0.1", *,
                 tensor_mode: str = "auto", write_timeout: Optional[float] = None,
                 log_level: Optional[str] = None, max_engines: Optional[int] = None):
        if protocol not in PROTOCOLS:
            raise ConfigError(f"Mooncake protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if tensor_mode not in TENSOR_MODES:
            raise ConfigError(f"tensor_mode must be one of {TENSOR_MODES}, got {tensor_mode!r}")
        if not isinstance(device_names, str):
            raise ConfigError("device_names must be a string (comma-separated RDMA device names)")
        if not isinstance(local_host, str) or not local_host or any(c.isspace() or c in "[]/" for c in local_host):
            raise ConfigError(f"local_host must be an IP address or host name, got {local_host!r}")
        if local_host in ("0.0.0.0", "::"):
            raise ConfigError("local_host is advertised to the peer: give this host's reachable IP, not a wildcard")
        if write_timeout is not None and not write_timeout > 0:
            raise ConfigError(f"write_timeout must be positive seconds or None, got {write_timeout!r}")
        if max_engines is not None:
            if isinstance(max_engines, str) and max_engines.strip().isdigit():
                max_engines = int(max_engines)
            if not isinstance(max_engines, int) or isinstance(max_engines, bool) or max_engines < 1:
                raise ConfigError(f"max_engines (mooncake_max_engines) must be a positive int, got {max_engines!r}")
        self.protocol = protocol
        self.device_names = device_names
        self.local_host = local_host
        self.tensor_mode = tensor_mode
        self.write_timeout = write_timeout
        self.max_engines = max_engines
        _resolve_log_level(log_level)          # validates, even when mooncake is already imported
        import_mooncake(log_level)
        if protocol == "rdma":
            _warn_rdma_fallback(device_names)
        self._key = (protocol, device_names, local_host)
        self._rdma_effective = protocol == "rdma" and bool(rdma_devices())
        # pipelined chunks pay off when the NIC moves the bytes (RDMA) while the
        # receiver copies; over TCP both compete for the CPU (measured on loopback,
        # 64 MiB chunks: 37.8 ms unpipelined vs 40.1 ms in 8 MiB pieces)
        self.pipelined = self._rdma_effective
        self._lock = threading.Lock()
        self._export_engine: Optional[_Engine] = None
        self._exported: dict[int, BlockPool] = {}           # id(pool) -> pool
        self._sessions: dict[str, _Engine] = {}              # peer session -> engine
        self._peers: set[MooncakePeer] = set()
        self._source_pools: dict[int, BlockPool] = {}        # id(pool) -> pool
        self._closed = False

    @classmethod
    def from_config(cls, cfg, local_host: Optional[str] = None, **kw) -> "MooncakeTransport":
        """Build from :class:`embresume.config.Config` (``mooncake_*`` fields)."""
        host = local_host or cfg.mooncake_host or "127.0.0.1"
        return cls(cfg.mooncake_protocol, cfg.mooncake_devices, host, **kw)

    # ------------------------------------------------------------- helpers
    @property
    def engine_limit(self) -> int:
        """The bound :meth:`open_peer` applies to the process's encoder-side
        engines: ``max_engines``, else ``MAX_PEER_ENGINES``."""
        return self.max_engines if self.max_engines is not None else MAX_PEER_ENGINES

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError("the Mooncake transport is closed")


    # ------------------------------------------------------- language side
    def export_pool(self, pool: BlockPool) -> dict:
        self._check_open()
        L = pool.layout
        with self._lock:
            if self._export_engine is None:
                # export engines are never recycled: a stale peer must not
                # reach memory registered later by another user of the port
                self._export_engine = _Engine(_new_engine(*self._key), self._key, recyclable=False)
            eng = self._export_engine
            base = pool.data_ptr()
            if id(pool) not in self._exported:
                eng.register(base, L.nbytes, _location_of(pool.backing.raw))
                self._exported[id(pool)] = pool
        desc = {"transport": self.name, "version": DESC_VERSION, "protocol": self.protocol,
                "session": eng.session, "base": base, "nbytes": L.nbytes, "layout": L.to_dict()}
        desc.update(_desc_geometry(L))
        return desc

    def unexport_pool(self, pool: BlockPool) -> None:
        with self._lock:
            if self._exported.pop(id(pool), None) is not None and self._export_engine is not None:
                self._export_engine.unregister(pool.data_ptr())

    @property
    def session(self) -> Optional[str]:
        """This side's export session (``host:port``) once a pool was exported."""
        return self._export_engine.session if self._export_engine else None

    # -------------------------------------------------------- encoder side
    def register_source_pool(self, pool: BlockPool) -> None:
        """Register the encoder's own pool (for :class:`BlockSource`) with every
        peer engine, now and for peers opened later.  Idempotent."""
        self._check_open()
        with self._lock:
            self._source_pools[id(pool)] = pool
            engines = list(self._sessions.values())
        for eng in engines:
            self._ensure_pool_registered(eng, pool, wait=False)

    def unregister_source_pool(self, pool: BlockPool) -> None:
        with self._lock:
            if self._source_pools.pop(id(pool), None) is None:
                return
            engines = list(self._sessions.values())
        for eng in engines:
            if eng.broken is None:
                with eng.lock:
                    eng.unregister(pool.data_ptr())

    def _ensure_pool_registered(self, eng: _Engine, pool: BlockPool, wait: bool = True) -> None:
        """Register ``pool`` in ``eng`` now; with ``wait=False`` leave it to the
        engine's next write when the engine is busy (possibly hung) or broken."""
        addr = pool.data_ptr()
        if eng.broken is not None or eng.regs.get(addr, 0) >= pool.layout.nbytes:
            return
        if not eng.lock.acquire(blocking=wait):
            return
        try:
            if eng.retired:          # its peer was closed meanwhile
                return
            eng.register(addr, pool.layout.nbytes, _location_of(pool.backing.raw))
        finally:
            eng.lock.release()

    def open_peer(self, desc: dict) -> MooncakePeer:
        self._check_open()
        layout, session, base, nbytes = self._validate_desc(desc)
        with self._lock:
            eng = self._sessions.get(session)
            if eng is None or eng.broken is not None:
                # a new engine for this session: counted against the process-wide bound
                _reserve_peer_engine(self.engine_limit, session)
                try:
                    eng = _Engine(_new_engine(*self._key), self._key, recyclable=True)
                except BaseException:
                    _unreserve_peer_engine()
                    raise
                self._sessions[session] = eng
            eng.refs += 1
            pools = list(self._source_pools.values())
            peer = MooncakePeer(layout, dict(desc), session, base, nbytes, eng, self)
            self._peers.add(peer)
        try:
            for p in pools:
                self._ensure_pool_registered(eng, p, wait=False)
        except BaseException:
            self.close_peer(peer)
            raise
        return peer

    def _validate_desc(self, desc: dict):
        if not isinstance(desc, dict):
            raise MooncakeDescError(f"Mooncake pool description must be a dict, got {type(desc).__name__}")
        if desc.get("transport", self.name) != self.name:
            raise MooncakeDescError(f"pool description is for transport {desc.get('transport')!r}, not mooncake")
        if desc.get("version", DESC_VERSION) != DESC_VERSION:
            raise MooncakeDescError(f"unsupported Mooncake description version {desc.get('version')!r} "
                                    f"(this side speaks {DESC_VERSION})")
        proto = desc.get("protocol", self.protocol)
        if proto != self.protocol:
            raise MooncakeDescError(f"peer exported its pool over Mooncake protocol {proto!r}, "
                                    f"this transport uses {self.protocol!r}")
        session = desc.get("session")
        parse_session(session)
        if not isinstance(desc.get("layout"), dict):
            raise MooncakeDescError("Mooncake pool description lacks a 'layout' dict")
        try:
            layout = BlockLayout.from_dict(desc["layout"])
        except ConfigError as e:
            raise MooncakeDescError(str(e)) from None
        base = _int_field(desc, "base", 1)
        nbytes = _int_field(desc, "nbytes", layout.nbytes)
        if base + nbytes > 1 << 64:
            raise MooncakeDescError(f"Mooncake pool description: base 0x{base:x} + nbytes {nbytes} overflows")
        geo = _desc_geometry(layout)
        for key in _LAYOUT_KEYS:
            if key in desc:
                got = _int_field(desc, key)
                if got != geo[key]:
                    raise MooncakeDescError(f"Mooncake pool description is inconsistent: {key}={got}, "
                                            f"but its layout {desc['layout']} gives {geo[key]}")
            elif key != "emb_row_bytes":
                raise MooncakeDescError(f"Mooncake pool description lacks {key!r}")
        return layout, session, base, nbytes

    def close_peer(self, peer: MooncakePeer) -> None:
        with self._lock:
            if peer.closed:
                return
            peer.closed = True
            self._peers.discard(peer)
            eng = peer.engine
            eng.refs -= 1
            last = eng.refs <= 0
            if last and self._sessions.get(peer.session) is eng:
                del self._sessions[peer.session]
        if eng.broken is None:
            with eng.lock:
                for st in (peer.meta, peer.emb):
                    if st.addr:
                        eng.unregister(st.addr)
        if last:
            if eng.broken is None:
                with eng.lock:
                    eng.release()
            else:
                eng.release()

    def probe(self, peer: MooncakePeer, timeout: float = 1.0) -> bool:
        """Ask the peer's engine for a Mooncake-level answer, waiting at most
        ``timeout`` seconds (a healthy peer answers in ~0.2 ms on loopback).

        A peer that does not answer in time is marked broken, so that a later
        :meth:`write_chunk` raises at once instead of blocking ~60 s.  (The probe
        thread itself may stay inside Mooncake for up to ~60 s; it does not hold
        the engine's lock -- measured.)
        """
        eng = peer.engine
        if peer.closed or eng.broken is not None:
            return False
        with eng._state:             # counted in flight: a released engine is never freed under it
            if eng.retired:
                return False
            eng.inflight += 1
            te = eng.te
        res: dict = {}
        done = threading.Event()

        def run():
            try:
                res["rc"] = te.send_probe(peer.session)
            except BaseException as e:  # noqa: BLE001
                res["exc"] = e
            finally:
                with eng._state:
                    eng.inflight -= 1
            done.set()

        threading.Thread(target=run, name=f"mooncake-probe-{peer.session}", daemon=True).start()
        if not done.wait(timeout):
            eng.broken = f"peer {peer.session} did not answer a Mooncake probe within {timeout:g} s"
            return False
        return res.get("rc") == 0

    # ------------------------------------------------------------ writes
    def build_triples(self, peer: MooncakePeer, src, plan: ChunkPlan, aux: Optional[torch.Tensor]):
        """Validate, stage what needs staging and return ``(srcs, dsts, lens,
        transient)``: the coalesced triples and the transient registrations
        (addresses) to drop after the write.  Caller holds ``peer.engine.lock``."""
        if not isinstance(src, (TensorSource, BlockSource)):
            raise TransferError(f"cannot send a {type(src).__name__}: expected TensorSource or BlockSource")
        L = peer.layout
        bs = L.block_size
        tokens = plan.tokens
        dst_blocks = plan.dst_blocks
        nblk = len(dst_blocks)
        if tokens <= 0 or nblk != -(-tokens // bs):
            raise TransferError(f"chunk plan of {tokens} tokens needs {-(-tokens // bs)} destination blocks, "
                                f"got {nblk}")
        if plan.src_block_end - plan.src_block_start != nblk:
            raise TransferError("chunk plan: source and destination block counts differ")
        nb = L.num_blocks
        for b in dst_blocks:
            if not 0 <= b < nb:
                raise TransferError(f"destination block {b} out of range [0, {nb}) of the peer pool")
        if src.hidden != L.hidden or src.dtype != L.dtype:
            raise TransferError(f"source is [{src.hidden}] {src.dtype}, the peer pool holds [{L.hidden}] {L.dtype}")
        if aux is not None:
            if isinstance(aux, np.ndarray):  # the endpoints' host aux record (source.aux_record)
                aux = torch.from_numpy(aux)
            if aux.dtype != torch.int32 or aux.dim() != 1 or not 0 < aux.numel() <= L.aux_ints:
                raise TransferError(f"aux must be a 1-D int32 tensor of at most {L.aux_ints} ints")

        eng = peer.engine
        S: list[int] = []
        D: list[int] = []
        N: list[int] = []

        def add(s: int, d: int, n: int) -> None:
            if S:
                k = N[-1]
                if S[-1] + k == s and D[-1] + k == d:
                    N[-1] = k + n
                    return
            S.append(s)
            D.append(d)
            N.append(n)

        row = L.emb_row_bytes
        ebb = L.emb_block_bytes
        fbb = bs * 4
        mbb = 3 * bs * 4
        last_n = tokens - (nblk - 1) * bs
        transient: list[int] = []

        def meta_triples(fill_at, mrope_at) -> None:
            """fill_ids and mrope ranges of every block (source addresses by block index)."""
            for j in range(nblk):
                add(fill_at(j), peer.fill_addr + dst_blocks[j] * fbb, (bs if j < nblk - 1 else last_n) * 4)
            for j in range(nblk):
                sm, dm = mrope_at(j), peer.mrope_addr + dst_blocks[j] * mbb
                if j < nblk - 1 or last_n == bs:
                    add(sm, dm, mbb)
                else:  # a partial last block: the sent tokens of each of the 3 rows
                    for c in range(3):
                        add(sm + c * fbb, dm + c * fbb, last_n * 4)

        if isinstance(src, BlockSource):
            sp = src.pool
            if sp.layout.block_size != bs:
                raise TransferError(f"source pool block size {sp.layout.block_size} differs from the peer's {bs}")
            if plan.src_block_end > len(src.blocks) or plan.src_block_start < 0:
                raise TransferError(f"chunk plan source blocks [{plan.src_block_start}, {plan.src_block_end}) "
                                    f"exceed the source's {len(src.blocks)} blocks")
            if id(sp) not in self._source_pools:
                with self._lock:       # other peer engines register it lazily, like this one
                    self._source_pools[id(sp)] = sp
            if not eng.covered(sp.data_ptr(), sp.layout.nbytes):
                eng.register(sp.data_ptr(), sp.layout.nbytes, _location_of(sp.backing.raw))
            SL = sp.layout
            sbase = sp.data_ptr()
            s_emb, s_fill, s_mrope = sbase + SL.emb_offset, sbase + SL.fill_offset, sbase + SL.mrope_offset
            sblocks = src.blocks[plan.src_block_start:plan.src_block_end]
            for j in range(nblk):
                n = bs if j < nblk - 1 else last_n
                add(s_emb + sblocks[j] * ebb, peer.emb_addr + dst_blocks[j] * ebb, n * row)
            meta_triples(lambda j: s_fill + sblocks[j] * fbb, lambda j: s_mrope + sblocks[j] * mbb)
            aux_src = None
        else:  # TensorSource
            t0 = plan.src_block_start * bs
            if t0 < 0 or t0 + tokens > src.total_tokens:
                raise TransferError(f"chunk of tokens [{t0}, {t0 + tokens}) exceeds the source's "
                                    f"{src.total_tokens} tokens")
            # metadata staging, laid out like the destination blocks:
            # fill [nblk, bs] | mrope [nblk, 3, bs] | aux [aux_ints]
            m_fill = 0
            m_mrope = nblk * fbb
            m_aux = m_mrope + nblk * mbb
            base = peer.meta.ensure(eng, m_aux + L.aux_ints * 4)
            mt = peer.meta.tensor
            copy_tensor(mt[m_fill:m_fill + tokens * 4].view(torch.int32), src.fill_ids[t0:t0 + tokens])
            mv = mt[m_mrope:m_mrope + nblk * mbb].view(torch.int32).view(nblk, 3, bs)
            full = tokens // bs
            if full:
                copy_tensor(mv[:full], src.mrope_positions[:, t0:t0 + full * bs].reshape(3, full, bs).transpose(0, 1))
            if last_n != bs:
                copy_tensor(mv[full, :, :last_n], src.mrope_positions[:, t0 + full * bs:t0 + tokens])
            aux_src = base + m_aux if aux is not None else None

            emb = src.embeddings
            e_addr = emb.data_ptr() + t0 * row
            e_len = tokens * row
            mode = self.tensor_mode
            if mode == "auto":
                mode = "stage" if self._rdma_effective else "register"
            if mode == "register":
                try:
                    loc = _location_of(emb)
                except TransferError:
                    mode = "stage"
                else:
                    if not eng.covered(e_addr, e_len):
                        if eng.overlaps(e_addr, e_len):
                            mode = "stage"
                        else:
                            try:
                                eng.register(e_addr, e_len, loc)
                                transient.append(e_addr)
                            except TransferError as e:
                                _LOG.debug("registering embeddings failed (%s); staging them", e)
                                mode = "stage"
            if mode == "stage":
                e_addr = peer.emb.ensure(eng, e_len)
                copy_tensor(peer.emb.tensor[:e_len].view(L.dtype).view(tokens, L.hidden), emb[t0:t0 + tokens])
            for j in range(nblk):
                n = bs if j < nblk - 1 else last_n
                add(e_addr + j * ebb, peer.emb_addr + dst_blocks[j] * ebb, n * row)
            meta_triples(lambda j: base + m_fill + j * fbb, lambda j: base + m_mrope + j * mbb)

        if aux is not None:
            n = aux.numel() * 4
            if isinstance(src, BlockSource):
                aux_src = peer.meta.ensure(eng, L.aux_ints * 4)
            off = aux_src - peer.meta.addr
            copy_tensor(peer.meta.tensor[off:off + n].view(torch.int32), aux)
            add(aux_src, peer.aux_addr + dst_blocks[0] * L.aux_ints * 4, n)
        return S, D, N, transient

    def write_chunk(self, peer: MooncakePeer, src, plan: ChunkPlan, aux: Optional[torch.Tensor]) -> None:
        """Write one chunk with one ``batch_transfer_sync_write``.

        Raises :class:`TransferError` when the peer is closed or broken, the
        chunk does not fit the peer's pool, or Mooncake reports a failure.
        **After a failure the destination blocks may still be written later**:
        the caller must not reuse them until the peer confirmed or the
        connection was torn down.
        """
        self._check_open()
        if peer.closed:
            raise TransferError(f"peer {peer.session} is closed")
        eng = peer.engine
        if eng.broken is not None:
            raise TransferError(f"peer {peer.session} is unusable: {eng.broken}")
        with eng.lock:
            if peer.closed:          # closed (its engine possibly released) while we waited
                raise TransferError(f"peer {peer.session} is closed")
            if eng.broken is not None:
                raise TransferError(f"peer {peer.session} is unusable: {eng.broken}")
            S, D, N, transient = self.build_triples(peer, src, plan, aux)
            te = eng.te
            session = peer.session
            # the memory read by the write must outlive a write left running
            # after a timeout: the closure keeps it referenced until it returns
            keep = (src, aux, peer.meta.tensor, peer.emb.tensor)

            def do(keep=keep) -> int:
                try:
                    return te.batch_transfer_sync_write(session, S, D, N)
                finally:
                    for a in transient:
                        eng.unregister(a)

            rc = eng.call(do, self.write_timeout)
        if rc != 0:
            raise TransferError(
                f"Mooncake write of {plan.tokens} tokens ({len(N)} ranges, {sum(N)} bytes) to {session} "
                f"failed with code {rc}; the destination blocks may still be written later -- do not reuse "
                "them until the peer confirmed or the connection is torn down")

    # ------------------------------------------------------------- close
    def close(self) -> None:
        """Close every peer and unregister everything (exported pools, source
        pools, staging).  Waits for writes in flight; an engine stuck in a
        timed-out write is unregistered by its worker once Mooncake gives up.
        Peer engines are recycled or released, the export engine is kept idle
        (module docstring)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            peers = list(self._peers)
        for p in peers:
            self.close_peer(p)
        with self._lock:
            for pool in list(self._exported.values()):
                if self._export_engine is not None:
                    self._export_engine.unregister(pool.data_ptr())
            self._exported.clear()
            self._source_pools.clear()
            if self._export_engine is not None:
                self._export_engine.release()     # not recyclable: kept idle until exit
                self._export_engine = None

    def __enter__(self) -> "MooncakeTransport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["MooncakeTransport", "MooncakePeer", "MooncakeDescError", "MooncakeEngineLimitError", "probe_peer", "parse_session",
           "mooncake_diagnostics", "mooncake_available", "import_mooncake", "rdma_devices"]
