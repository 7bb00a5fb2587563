"""CUDA IPC mechanics of the same-host GPU path: pools, handles and their cache.

The transport built on them is :mod:`embresume.transport.cuda_ipc`.

Language side: the pool is one direct ``cudaMalloc`` (:class:`CudaBacking`,
never from a caching allocator, whose blocks may be sub-allocated or
recycled), exported once as a JSON-able description::

    {"kind": "cuda_ipc", "version": 1, "handle": <64 bytes as hex>, "offset": 0,
     "size": nbytes, "device": index, "pci_bus_id": "0000:..", "generation": g,
     "pid": pid, "proc_token": hex, "pidns": "pid:[...]", "boot_id": "...",
     "layout": {...}}

Encoder side: :class:`IpcHandleCache` opens each peer handle once
(``cudaIpcOpenMemHandle`` with ``cudaIpcMemLazyEnablePeerAccess``, about
0.5 ms) keyed by ``(pid, handle, generation)`` and hands out the cached
pointer on every re-open; the mapping is closed when the last user released
it (the connection to that peer is torn down).  The pointer is wrapped as a
torch uint8 tensor and a :class:`~embresume.blocks.BlockPool` is laid over it,
so the ordinary :func:`embresume.kernels.scatter_chunk` writes into it.

:meth:`embresume.transport.cuda_ipc.CudaIpcTransport.write_chunk` launches the fused scatter kernel and
synchronises the stream before it returns: the encoder posts the chunk's
status only after the bytes are in the peer's memory.

CUDA IPC cannot work (:class:`CudaIpcUnavailable` is raised so the caller can
fall back to the shm transport) when: CuPy or a GPU is missing; both ends are
the same process (opening a handle in the process that created it fails with
``cudaErrorDeviceUninitialized``); the two processes are in different PID
namespaces or on different hosts (boot ids differ); the peer's GPU is not
visible here; or the driver refuses the handle.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import secrets
import threading
import weakref
from typing import Callable, Optional

import torch
import logging

from embresume.blocks import BlockLayout, BlockPool
from embresume.errors import TransferError, TransportUnavailable

DESC_KIND = "cuda_ipc"
DESC_VERSION = 1
HANDLE_BYTES = 64


log = logging.getLogger("embresume.cuda_ipc")


class CudaIpcUnavailable(TransportUnavailable):
    """CUDA IPC cannot connect these two processes; use another transport.

    ``reason`` says why in one line (suitable for the fallback log line)."""

    def __init__(self, reason: str):
        super().__init__(f"CUDA IPC unavailable: {reason}")
        self.reason = reason


# ---------------------------------------------------------------------------
# lazy CuPy
# ---------------------------------------------------------------------------
def _cupy():
    try:
        import cupy
    except Exception as e:
        raise CudaIpcUnavailable(f"CuPy is not importable ({type(e).__name__}: {e})") from None
    return cupy


def require_cuda():
    if not torch.cuda.is_available():
        raise CudaIpcUnavailable("no CUDA device is visible to torch")
    return _cupy()


# ---------------------------------------------------------------------------
# process identity
# ---------------------------------------------------------------------------
_ident_lock = threading.Lock()
_ident: Optional[dict] = None


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _readlink(path: str) -> Optional[str]:
    try:
        return os.readlink(path)
    except OSError:
        return None


def process_identity() -> dict:
    """pid, a random per-process token (renewed after fork), PID namespace and boot id."""
    global _ident
    with _ident_lock:
        if _ident is None or _ident["pid"] != os.getpid():
            _ident = {"pid": os.getpid(), "proc_token": secrets.token_hex(8),
                      "pidns": _readlink("/proc/self/ns/pid"),
                      "boot_id": _read("/proc/sys/kernel/random/boot_id")}
        return dict(_ident)


def check_ipc_possible(desc: dict) -> None:
    """Raise :class:`CudaIpcUnavailable` when ``desc`` (from :meth:`CudaIpcTransport.export_pool`)
    cannot be opened from this process, for reasons visible before touching the driver."""
    me = process_identity()
    if desc.get("boot_id") and me["boot_id"] and desc["boot_id"] != me["boot_id"]:
        raise CudaIpcUnavailable("the pool was exported on another host (boot ids differ)")
    if desc.get("pidns") and me["pidns"] and desc["pidns"] != me["pidns"]:
        raise CudaIpcUnavailable(f"the exporter runs in another PID namespace ({desc['pidns']} vs {me['pidns']})")
    if int(desc.get("pid", -1)) == me["pid"] and desc.get("proc_token") == me["proc_token"]:
        raise CudaIpcUnavailable("exporter and opener are the same process "
                                 "(a CUDA IPC handle cannot be opened by the process that created it)")


def parse_desc(desc: dict) -> tuple[BlockLayout, bytes, int, int]:
    """Validate a description; returns (layout, handle, offset, size)."""
    if not isinstance(desc, dict) or desc.get("kind") != DESC_KIND:
        raise TransferError(f"not a CUDA IPC pool description: {desc!r:.200}")
    if int(desc.get("version", -1)) != DESC_VERSION:
        raise TransferError(f"CUDA IPC description version {desc.get('version')!r}, expected {DESC_VERSION}")
    try:
        handle = bytes.fromhex(desc["handle"])
        offset, size = int(desc["offset"]), int(desc["size"])
        int(desc["generation"]), int(desc["pid"]), int(desc["device"])
    except (KeyError, TypeError, ValueError) as e:
        raise TransferError(f"malformed CUDA IPC description: {type(e).__name__}: {e}") from None
    if len(handle) != HANDLE_BYTES:
        raise TransferError(f"a CUDA IPC handle has {HANDLE_BYTES} bytes, got {len(handle)}")
    layout = BlockLayout.from_dict(desc["layout"])
    if offset < 0 or offset + layout.nbytes > size:
        raise TransferError(f"peer pool of {size} bytes at offset {offset} is smaller than its layout needs "
                            f"({layout.nbytes})")
    return layout, handle, offset, size


# ---------------------------------------------------------------------------
# device pointers as torch tensors
# ---------------------------------------------------------------------------
class _CudaBuffer:
    """Minimal ``__cuda_array_interface__`` exporter; keeps ``owner`` alive
    for as long as any torch tensor over it exists."""

    def __init__(self, ptr: int, nbytes: int, owner):
        self._owner = owner
        self.__cuda_array_interface__ = {
            "shape": (int(nbytes),), "typestr": "|u1", "data": (int(ptr), False),
            "strides": None, "version": 3, "stream": None,
        }


def wrap_device_pointer(ptr: int, nbytes: int, device: int, owner=None) -> torch.Tensor:
    """A torch uint8 tensor over raw device memory of GPU ``device`` (no
    copy).  ``owner`` is referenced until the last tensor (or view) over the
    memory is freed."""
    try:
        t = torch.as_tensor(_CudaBuffer(ptr, nbytes, owner), device=torch.device("cuda", device))
        ok = t.data_ptr() == int(ptr) and t.numel() == nbytes and t.is_cuda
    except Exception:
        ok = False
    if not ok:
        # a torch without in-place __cuda_array_interface__ import: go through DLPack
        cp = _cupy()
        mem = cp.cuda.UnownedMemory(int(ptr), int(nbytes), owner, device)
        arr = cp.ndarray((int(nbytes),), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0))
        t = torch.from_dlpack(arr)
    if t.data_ptr() != int(ptr) or t.numel() != nbytes or not t.is_cuda:
        raise TransferError("torch did not wrap the device pointer in place")
    return t


def local_device_for(desc: dict) -> int:
    """This process's index of the exporter's GPU (indices differ between
    processes with different CUDA_VISIBLE_DEVICES; the PCI bus id does not)."""
    cp = _cupy()
    bus = desc.get("pci_bus_id")
    if bus:
        try:
            return int(cp.cuda.runtime.deviceGetByPCIBusId(bus))
        except cp.cuda.runtime.CUDARuntimeError:
            _clear_last_cuda_error()
            raise CudaIpcUnavailable(f"the peer's GPU {bus} is not visible in this process") from None
    return int(desc["device"])


def _clear_last_cuda_error() -> None:
    """A refused runtime call leaves its error as the thread's "last error",
    where torch's next kernel-launch check would find it: reset it in every
    CUDA runtime library loaded in this process."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "libcudart" in line and "/" in line}
    except OSError:
        return
    mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 1)
    for lib in libs:
        try:
            ctypes.CDLL(lib, mode=mode).cudaGetLastError()
        except (OSError, AttributeError):
            pass


# ---------------------------------------------------------------------------
# the language side's pool backing
# ---------------------------------------------------------------------------
_generations = itertools.count(1)
#: same-process registry: generation -> backing (for an in-process fallback)
_local_backings: "weakref.WeakValueDictionary[int, CudaBacking]" = weakref.WeakValueDictionary()


class CudaBacking:
    """Pool memory from one direct ``cudaMalloc`` (``cupy.cuda.memory.Memory``,
    not CuPy's or torch's caching pool), as a torch uint8 tensor ``raw``.
    Satisfies :class:`embresume.blocks.Backing`.  ``generation`` is unique
    within the process, so a re-created pool never aliases an old one in a
    peer's handle cache."""

    def __init__(self, nbytes: int, device=None, zero: bool = True):
        if nbytes <= 0:
            raise ValueError("a CUDA pool needs a positive size")
        cp = require_cuda()
        if device is None:
            dev = torch.cuda.current_device()
        else:
            d = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
            if d.type != "cuda":
                raise ValueError(f"CudaBacking needs a CUDA device, got {device!r}")
            dev = d.index if d.index is not None else torch.cuda.current_device()
        with cp.cuda.Device(dev):
            self._mem = cp.cuda.memory.Memory(nbytes)      # cudaMalloc, freed with the last view
            self.pci_bus_id = cp.cuda.runtime.deviceGetPCIBusId(dev)
        self.ptr = int(self._mem.ptr)
        self.nbytes = int(nbytes)
        self.device_index = dev
        self.generation = next(_generations)
        self._handle: Optional[bytes] = None
        self.raw = wrap_device_pointer(self.ptr, self.nbytes, dev, owner=self._mem)
        if zero:
            with torch.cuda.device(dev):
                self.raw.zero_()
                torch.cuda.current_stream(dev).synchronize()
        _local_backings[self.generation] = self

    @classmethod
    def create_pool(cls, layout: BlockLayout, device=None) -> BlockPool:
        return BlockPool(layout, cls(layout.nbytes, device))

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.device_index)

    def ipc_handle(self) -> bytes:
        """The allocation's CUDA IPC handle (computed once, about 0.02 ms)."""
        if self._handle is None:
            if self._mem is None:
                raise TransferError("the CUDA pool is closed")
            cp = _cupy()
            with cp.cuda.Device(self.device_index):
                self._handle = bytes(cp.cuda.runtime.ipcGetMemHandle(self.ptr))
        return self._handle

    @property
    def closed(self) -> bool:
        return self._mem is None

    def close(self) -> None:
        """Drop this backing's references; the memory is freed (``cudaFree``,
        which waits for pending work) once no tensor view is left."""
        _local_backings.pop(self.generation, None)
        self.raw = torch.empty(0, dtype=torch.uint8)
        self._mem = None


def local_backing(generation: int) -> Optional[CudaBacking]:
    """The live :class:`CudaBacking` of this process with that generation, if any."""
    return _local_backings.get(int(generation))


def create_cuda_pool(layout: BlockLayout, device=None) -> BlockPool:
    return CudaBacking.create_pool(layout, device)


# ---------------------------------------------------------------------------
# the encoder side's handle cache
# ---------------------------------------------------------------------------
def _cuda_open(handle: bytes, device: int) -> int:
    cp = _cupy()
    rt = cp.cuda.runtime
    with cp.cuda.Device(device):
        try:
            return int(rt.ipcOpenMemHandle(handle, rt.cudaIpcMemLazyEnablePeerAccess))
        except rt.CUDARuntimeError as e:
            _clear_last_cuda_error()
            raise CudaIpcUnavailable(f"the driver refused the handle: {e}") from None


def _cuda_close(ptr: int, device: int) -> None:
    cp = _cupy()
    with cp.cuda.Device(device):
        cp.cuda.runtime.ipcCloseMemHandle(ptr)


class _Entry:
    __slots__ = ("ptr", "device", "refs")

    def __init__(self, ptr: int, device: int):
        self.ptr, self.device, self.refs = ptr, device, 0


class IpcHandleCache:
    """Opens each peer handle once; keyed by ``(pid, handle, generation)``.

    :meth:`open` returns the mapped base pointer (the cached one on every
    re-open) and takes a reference; :meth:`release` drops it and closes the
    mapping with the last one; :meth:`close_pid` closes everything of a peer
    process at once (disconnect).  ``opens`` / ``closes`` count driver calls.
    The opener/closer are injectable for tests."""

    def __init__(self, opener: Optional[Callable[[bytes, int], int]] = None,
                 closer: Optional[Callable[[int, int], None]] = None):
        self._open = opener or _cuda_open
        self._close = closer or _cuda_close
        self._entries: dict[tuple, _Entry] = {}
        self._lock = threading.Lock()
        self.opens = 0
        self.closes = 0

    @staticmethod
    def key_of(desc: dict) -> tuple:
        return (int(desc["pid"]), str(desc["handle"]).lower(), int(desc["generation"]))

    def open(self, desc: dict, device: int) -> int:
        key = self.key_of(desc)
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                ptr = self._open(bytes.fromhex(desc["handle"]), device)
                self.opens += 1
                e = self._entries[key] = _Entry(int(ptr), device)
                # an older generation of the same peer pool is stale: close it if unused
                for k in [k for k, v in self._entries.items()
                          if k[0] == key[0] and k[2] < key[2] and v.refs == 0]:
                    self._close_entry(k)
            e.refs += 1
            return e.ptr

    def release(self, key: tuple) -> None:
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return
            e.refs -= 1
            if e.refs <= 0:
                self._close_entry(key)

    def close_pid(self, pid: int) -> int:
        """Close every mapping of peer process ``pid``; returns how many."""
        with self._lock:
            keys = [k for k in self._entries if k[0] == int(pid)]
            for k in keys:
                self._close_entry(k)
            return len(keys)

    def close_all(self) -> None:
        with self._lock:
            for k in list(self._entries):
                self._close_entry(k)

    def _close_entry(self, key: tuple) -> None:
        e = self._entries.pop(key)
        try:
            self._close(e.ptr, e.device)
        finally:
            self.closes += 1

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def refs(self, key: tuple) -> int:
        e = self._entries.get(key)
        return 0 if e is None else e.refs


_default_cache: Optional[IpcHandleCache] = None
_default_lock = threading.Lock()


def default_cache() -> IpcHandleCache:
    """The process-wide cache (one mapping per peer pool per process)."""
    global _default_cache
    with _default_lock:
        if _default_cache is None:
            _default_cache = IpcHandleCache()
        return _default_cache


class OpenedBacking:
    """Backing of a peer pool opened from the cache; ``close`` releases it."""

    def __init__(self, raw: torch.Tensor, cache: Optional[IpcHandleCache], key: Optional[tuple]):
        self.raw = raw
        self._cache, self._key = cache, key

    def close(self) -> None:
        self.raw = torch.empty(0, dtype=torch.uint8)
        cache, self._cache = self._cache, None
        if cache is not None:
            cache.release(self._key)


__all__ = ["CudaBacking", "CudaIpcUnavailable", "OpenedBacking", "IpcHandleCache",
           "check_ipc_possible", "create_cuda_pool", "default_cache", "local_backing", "local_device_for",
           "require_cuda", "parse_desc", "process_identity",
           "wrap_device_pointer"]
