"""Same-host CPU transport: the language rank's pool lives in POSIX shared
memory; the encoder maps it once at handshake and copies blocks straight
into it (one copy, no staging)."""

from __future__ import annotations

from typing import Optional

import torch

from ..blocks import BlockLayout, BlockPool
from ..errors import TransferError
from ..kernels import scatter_chunk
from ..planner import ChunkPlan
from ..transport.base import PeerPool, Transport
from .shm import ShmBacking


class ShmPeer(PeerPool):
    def __init__(self, layout: BlockLayout, desc: dict, pool: BlockPool):
        super().__init__(layout, desc)
        self.pool = pool

    def close(self) -> None:
        self.pool.close()


class ShmTransport(Transport):
    name = "shm"
    pipelined = True

    def create_backing(self, nbytes: int, device: str, prefault: bool = True) -> ShmBacking:
        if device != "cpu":
            raise TransferError("the shm transport carries CPU pools only; use cuda_ipc for GPU pools")
        return ShmBacking.create(nbytes, prefault=prefault)

    def export_pool(self, pool: BlockPool) -> dict:
        backing = pool.backing
        if not isinstance(backing, ShmBacking):
            raise TransferError("the shm transport needs a pool backed by POSIX shared memory")
        return {"segment": backing.segment.name, "nbytes": pool.layout.nbytes, "layout": pool.layout.to_dict()}

    def unexport_pool(self, pool: BlockPool) -> None:
        if isinstance(pool.backing, ShmBacking):
            pool.backing.segment.unlink()

    def open_peer(self, desc: dict) -> ShmPeer:
        layout = BlockLayout.from_dict(desc["layout"])
        nbytes = int(desc["nbytes"])
        if nbytes < layout.nbytes:
            raise TransferError(f"peer pool of {nbytes} bytes is smaller than its layout needs ({layout.nbytes})")
        backing = ShmBacking.attach(desc["segment"], layout.nbytes)
        return ShmPeer(layout, desc, BlockPool(layout, backing))

    def write_chunk(self, peer: ShmPeer, src, plan: ChunkPlan, aux: Optional[torch.Tensor]) -> None:
        block0 = plan.src_block_start
        if src.device.type != "cpu":
            # host path for a GPU source (CUDA IPC unavailable): one D2H copy of the chunk
            from ..kernels.cuda import stage_source
            src = stage_source(src, block0, plan.tokens, peer.layout.block_size, len(plan.dst_blocks),
                               torch.device("cpu"))
            block0 = 0
        scatter_chunk(peer.pool, plan.dst_blocks, src, block0, plan.tokens, aux)
