"""Same-host CPU transport: the language endpoint's pool lives in anonymous
shared memory (a sealed memfd, :mod:`embresume.ipc.shm`); each encoder maps it
once at handshake, from the fd passed over the handshake's Unix socket, and
copies blocks straight into it (one copy, no staging).

One segment serves every encoder of the endpoint.  It has no name: it goes
away with the last process that maps it, however that process ends.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..blocks import BlockLayout, BlockPool
from ..errors import TransferError, TransportUnavailable
from ..kernels import scatter_chunk
from ..planner import ChunkPlan
from ..source import stage_chunk
from .base import PeerPool, Transport


class ShmPeer(PeerPool):
    def __init__(self, layout: BlockLayout, desc: dict, pool: BlockPool):
        super().__init__(layout, desc)
        self.pool = pool

    def close(self) -> None:
        self.pool.close()


class ShmTransport(Transport):
    name = "shm"
    same_host_only = True
    pool_devices = ("cpu",)
    pipelined = True

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        import os
        if not hasattr(os, "memfd_create"):  # pragma: no cover - Linux has it
            return "this platform has no memfd_create"
        return None

    @classmethod
    def create_backing(cls, nbytes: int, device: str, prefault: bool = True):
        from ..ipc.shm import ShmBacking
        if device != "cpu":
            raise TransportUnavailable("the shm transport carries CPU pools only")
        return ShmBacking.create(nbytes, prefault=prefault)

    def can_export(self, pool: BlockPool) -> bool:
        from ..ipc.shm import ShmBacking
        return isinstance(pool.backing, ShmBacking)

    def export_pool(self, pool: BlockPool) -> dict:
        if not self.can_export(pool):
            raise TransportUnavailable("the shm transport needs a pool in shared memory (a memfd)")
        from ..ipc.unix import Fd
        return {"fd": Fd(pool.backing.segment.fd), "nbytes": pool.layout.nbytes,
                "layout": pool.layout.to_dict()}

    def open_peer(self, desc: dict) -> ShmPeer:
        from ..ipc.shm import ShmBacking
        layout = BlockLayout.from_dict(desc["layout"])
        nbytes = int(desc["nbytes"])
        if nbytes < layout.nbytes:
            raise TransferError(f"peer pool of {nbytes} bytes is smaller than its layout needs ({layout.nbytes})")
        from ..ipc.unix import Fd
        fd = desc.get("fd")
        if not isinstance(fd, Fd):         # a bare number would name one of OUR fds
            raise TransferError("the shm pool description carries no fd (it travels over the Unix-socket handshake)")
        try:
            backing = ShmBacking.from_fd(fd, layout.nbytes)
        except ValueError as e:
            raise TransferError(str(e)) from None
        return ShmPeer(layout, {k: v for k, v in desc.items() if k != "fd"}, BlockPool(layout, backing))

    def write_chunk(self, peer: ShmPeer, src, plan: ChunkPlan, aux: Optional[torch.Tensor]) -> None:
        block0 = plan.src_block_start
        if src.device.type != "cpu":
            # host path for a GPU source: one D2H copy of the chunk
            src = stage_chunk(src, block0, plan.tokens, peer.layout.block_size, len(plan.dst_blocks),
                              torch.device("cpu"))
            block0 = 0
        scatter_chunk(peer.pool, plan.dst_blocks, src, block0, plan.tokens, aux)
