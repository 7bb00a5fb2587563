"""Same-host GPU transport: the language endpoint's pool is one cudaMalloc,
exported once as a CUDA IPC handle (:mod:`embresume.ipc.cuda_ipc`); each
encoder opens it once (cached per process) and writes every chunk with one
fused CuPy scatter kernel (:mod:`embresume.kernels.cuda`), synchronising the
stream before the chunk's status is posted.

When the two processes cannot share the handle (same process, different PID
namespaces or hosts, no peer GPU visible, the driver refuses it) the open
raises :class:`~embresume.ipc.cuda_ipc.CudaIpcUnavailable`, a
:class:`~embresume.errors.TransportUnavailable`: the handshake falls back to
the next transport both sides allow.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Optional

import torch

from ..blocks import BlockLayout, BlockPool
from ..errors import TransferError, TransportUnavailable
from ..planner import ChunkPlan
from ..source import stage_chunk
from .base import PeerPool, Transport

log = logging.getLogger("embresume.cuda_ipc")


class CudaIpcPeer(PeerPool):
    def __init__(self, layout: BlockLayout, desc: dict, pool: BlockPool, device: int, staged: bool,
                 key: Optional[tuple], same_process: bool = False):
        super().__init__(layout, desc)
        self.pool = pool
        self.device = device          # this process's index of the peer pool's GPU
        self.staged = staged          # no peer access: copy through pinned host memory
        self.key = key
        self.same_process = same_process
        self.launch_device = device   # the GPU whose context holds the mapping (kernels run there)
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.pool.close()


class CudaIpcTransport(Transport):
    """Writes into GPU pools of other processes on this host through CUDA IPC.

    ``device``: the encoder's GPU (default: torch's current device when a
    peer is opened).  ``allow_same_process``: open a pool exported by this
    very process directly (no IPC) instead of raising
    :class:`CudaIpcUnavailable` -- for tests and single-process setups."""

    name = "cuda_ipc"
    same_host_only = True
    pool_devices = ("cuda",)

    def __init__(self, device=None, cache=None, allow_same_process: bool = False):
        self._device = device
        self._cache = cache
        self.allow_same_process = allow_same_process
        self._peers: "weakref.WeakSet[CudaIpcPeer]" = weakref.WeakSet()
        self._exported: dict[int, dict] = {}

    # ------------------------------------------------------ discovery
    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        if not torch.cuda.is_available():
            return "no CUDA device"
        from ..kernels import cuda as kcuda
        return kcuda.unavailable_reason()

    @classmethod
    def create(cls, config, peer_host: Optional[str]) -> "CudaIpcTransport":
        dev = config.device if config.device.startswith("cuda") else None
        return cls(device=dev, allow_same_process=True)

    @property
    def cache(self):
        if self._cache is None:
            from ..ipc.cuda_ipc import default_cache
            self._cache = default_cache()
        return self._cache

    def _encoder_device(self) -> int:
        if self._device is None:
            return torch.cuda.current_device()
        if isinstance(self._device, int):
            return self._device
        d = torch.device(self._device)
        return d.index if d.index is not None else torch.cuda.current_device()

    # ------------------------------------------------------ language side
    @classmethod
    def create_backing(cls, nbytes: int, device: str, prefault: bool = True):
        if not str(device).startswith("cuda"):
            raise TransportUnavailable("the cuda_ipc transport carries GPU pools only")
        reason = cls.unavailable_reason()
        if reason:
            raise TransportUnavailable(reason)
        from ..ipc.cuda_ipc import CudaBacking
        return CudaBacking(nbytes, device)

    def can_export(self, pool: BlockPool) -> bool:
        from ..ipc.cuda_ipc import CudaBacking
        return isinstance(pool.backing, CudaBacking) and not pool.backing.closed

    def export_pool(self, pool: BlockPool) -> dict:
        from ..ipc.cuda_ipc import DESC_KIND, DESC_VERSION, process_identity
        if not self.can_export(pool):
            raise TransportUnavailable("the cuda_ipc transport needs an open pool backed by CudaBacking (one cudaMalloc)")
        backing = pool.backing
        desc = {
            "kind": DESC_KIND, "version": DESC_VERSION,
            "handle": backing.ipc_handle().hex(), "offset": 0, "size": backing.nbytes,
            "device": backing.device_index, "pci_bus_id": backing.pci_bus_id,
            "generation": backing.generation, **process_identity(), "layout": pool.layout.to_dict(),
        }
        self._exported[backing.generation] = desc
        return desc

    def unexport_pool(self, pool: BlockPool) -> None:
        # a CUDA IPC handle cannot be revoked; peers' mappings keep the memory
        # alive until they close them.  Forget the description.
        gen = getattr(pool.backing, "generation", None)
        if gen is not None:
            self._exported.pop(gen, None)

    # ------------------------------------------------------- encoder side
    def open_peer(self, desc: dict) -> CudaIpcPeer:
        from ..ipc import cuda_ipc as ipc
        from ..kernels import cuda as kcuda

        layout, handle, offset, size = ipc.parse_desc(desc)
        try:
            ipc.check_ipc_possible(desc)
        except ipc.CudaIpcUnavailable:
            if self.allow_same_process and int(desc["pid"]) == os.getpid():
                local = ipc.local_backing(int(desc["generation"]))
                if local is not None and not local.closed and local.ipc_handle().hex() == desc["handle"].lower():
                    raw = local.raw[offset:offset + layout.nbytes]
                    pool = BlockPool(layout, ipc.OpenedBacking(raw, None, None))
                    log.info("CUDA IPC cannot open a handle in the process that exported it: "
                             "using a same-process device copy")
                    peer = CudaIpcPeer(layout, desc, pool, local.device_index, False, None, same_process=True)
                    self._peers.add(peer)
                    return peer
            raise
        ipc.require_cuda()
        peer_dev = ipc.local_device_for(desc)
        enc_dev = self._encoder_device()
        staged = peer_dev != enc_dev and not kcuda._can_access(enc_dev, peer_dev)
        # with peer access the mapping lives in the encoder's context (lazy peer
        # enable); without it, in the peer GPU's own context, written from there
        open_dev = peer_dev if staged else enc_dev
        cache = self.cache
        key = cache.key_of(desc)
        base = cache.open(desc, open_dev)
        try:
            raw = ipc.wrap_device_pointer(base + offset, layout.nbytes, peer_dev)
            pool = BlockPool(layout, ipc.OpenedBacking(raw, cache, key))
        except BaseException:
            cache.release(key)
            raise
        peer = CudaIpcPeer(layout, desc, pool, peer_dev, staged, key)
        peer.launch_device = open_dev
        self._peers.add(peer)
        return peer

    def write_chunk(self, peer: CudaIpcPeer, src, plan: ChunkPlan, aux: Optional[torch.Tensor]) -> None:
        from ..kernels import cuda as kcuda
        from ..kernels import scatter_chunk

        if peer._closed:
            raise TransferError("write to a closed CUDA IPC peer")
        pool = peer.pool
        bs = pool.layout.block_size
        src_block0 = plan.src_block_start
        sdev = kcuda._src_device(src)
        if plan.tokens > 0 and (peer.staged or sdev is None or sdev.type != "cuda"):
            # no peer access between the GPUs: stage the chunk through pinned
            # host memory onto the peer's GPU, then scatter there.  A host
            # source goes to the GPU whose context holds the mapping.
            dev = torch.device("cuda", peer.launch_device)
            src = stage_chunk(src, src_block0, plan.tokens, bs, len(plan.dst_blocks), dev,
                              dtype=pool.layout.dtype, pin=peer.staged)
            src_block0 = 0
        scatter_chunk(pool, plan.dst_blocks, src, src_block0, plan.tokens, aux)
        # the status may only be posted once the kernel completed: wait for
        # the streams the launch (or a fallback copy) used
        devs = {peer.device, peer.launch_device}
        sdev = kcuda._src_device(src)
        if sdev is not None and sdev.type == "cuda":
            devs.add(sdev.index if sdev.index is not None else torch.cuda.current_device())
        for d in devs:
            torch.cuda.current_stream(d).synchronize()

    def close_peer(self, peer: CudaIpcPeer) -> None:
        peer.close()
        self._peers.discard(peer)

    def close(self) -> None:
        for peer in list(self._peers):
            self.close_peer(peer)
        self._exported.clear()


__all__ = ["CudaIpcPeer", "CudaIpcTransport"]
