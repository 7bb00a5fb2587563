"""Same-host CPU transport: the language endpoint's pool lives in POSIX shared
memory; each encoder maps it once at handshake and copies blocks straight
into it (one copy, no staging).

One segment serves every encoder of the endpoint: its name stays in
``/dev/shm`` while the endpoint lives (so an encoder that connects later, or
reconnects after a restart, can map it) and is unlinked at close; a segment
left by a killed process is swept by the next endpoint that starts
(:mod:`embresume.ipc.shm`).
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
    control = "ring"
    pipelined = True

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        try:
            import posix_ipc  # noqa: F401
        except Exception as e:  # pragma: no cover - depends on the machine
            return f"posix_ipc does not import: {e}"
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
            raise TransportUnavailable("the shm transport needs a pool backed by POSIX shared memory")
        return {"segment": pool.backing.segment.name, "nbytes": pool.layout.nbytes,
                "layout": pool.layout.to_dict()}

    def unexport_pool(self, pool: BlockPool) -> None:
        if self.can_export(pool):
            pool.backing.segment.unlink()

    def open_peer(self, desc: dict) -> ShmPeer:
        from ..ipc.shm import ShmBacking
        layout = BlockLayout.from_dict(desc["layout"])
        nbytes = int(desc["nbytes"])
        if nbytes < layout.nbytes:
            raise TransferError(f"peer pool of {nbytes} bytes is smaller than its layout needs ({layout.nbytes})")
        backing = ShmBacking.attach(desc["segment"], layout.nbytes)
        return ShmPeer(layout, desc, BlockPool(layout, backing))

    def peer_died(self, peer: ShmPeer) -> None:
        # the language endpoint keeps its pool's name while it lives (encoders
        # that connect later map it); killed, it cannot unlink it: we do, if the
        # creator named in it (/embr-<pid>.<pidns>-...) is really gone
        from ..ipc.shm import PREFIX, creator_pid, unlink_segment
        from ..node import pid_alive
        name = str(peer.desc.get("segment", ""))
        pid = creator_pid(name.lstrip("/")) if name.startswith(PREFIX) else None
        if pid is not None and not pid_alive(pid):
            unlink_segment(name)

    def write_chunk(self, peer: ShmPeer, src, plan: ChunkPlan, aux: Optional[torch.Tensor]) -> None:
        block0 = plan.src_block_start
        if src.device.type != "cpu":
            # host path for a GPU source: one D2H copy of the chunk
            src = stage_chunk(src, block0, plan.tokens, peer.layout.block_size, len(plan.dst_blocks),
                              torch.device("cpu"))
            block0 = 0
        scatter_chunk(peer.pool, plan.dst_blocks, src, block0, plan.tokens, aux)
