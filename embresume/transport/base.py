"""The data-plane interface every transport implements.

Lifecycle (NIXL-style: register -> exchange metadata -> transfer -> close)::

    language rank                                  encoder
    -------------                                  -------
    pool = BlockPool(...)          (one per rank, created by the endpoint)
    desc = t.export_pool(pool)  --- handshake --->  peer = t.open_peer(desc)   # once per peer pool
                                                    t.write_chunk(peer, src, plan, dst_blocks, aux)
                                <-- STATUS ------   (posted only after write_chunk returned)
    t.unexport_pool(pool)                           t.close_peer(peer)
    t.close()                                       t.close()

``write_chunk`` is synchronous: when it returns, the bytes are visible to the
peer (CPU stores done, CUDA kernel completed, Mooncake write acknowledged), so
the encoder may post the chunk's status.  If it raises, the destination
blocks may still be written later (a timed-out RDMA write): the language side
must not hand them to another request until the connection is torn down or
the peer confirmed.

Everything above this interface (allocator, protocol, planner, merge,
endpoints) is transport-agnostic.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Optional

import torch

from ..blocks import BlockLayout, BlockPool
from ..planner import ChunkPlan


class PeerPool:
    """An opened description of a peer's receive pool (transport specific)."""

    def __init__(self, layout: BlockLayout, desc: dict):
        self.layout = layout
        self.desc = desc

    def close(self) -> None:  # pragma: no cover - overridden where needed
        pass


class Transport(abc.ABC):
    name: ClassVar[str]
    #: worth splitting a chunk into pieces whose PROGRESS lets the receiver
    #: copy out earlier pieces while later ones are written (CPU-driven copies)
    pipelined: ClassVar[bool] = False

    # ------------------------------------------------------ language side
    def create_backing(self, nbytes: int, device: str, prefault: bool = True):
        """Memory for a receive pool this transport can export."""
        from ..blocks import TorchBacking
        return TorchBacking(nbytes, device)

    @abc.abstractmethod
    def export_pool(self, pool: BlockPool) -> dict:
        """Make ``pool`` writable by a peer; return a JSON-able description."""

    def unexport_pool(self, pool: BlockPool) -> None:
        """Undo :meth:`export_pool` (called when the language endpoint closes)."""

    # ------------------------------------------------------- encoder side
    @abc.abstractmethod
    def open_peer(self, desc: dict) -> PeerPool:
        """Open a peer's pool description (done once per peer pool)."""

    @abc.abstractmethod
    def write_chunk(self, peer: PeerPool, src: Any, plan: ChunkPlan,
                    aux: Optional[torch.Tensor]) -> None:
        """Write ``plan.tokens`` tokens of ``src`` (from source block
        ``plan.src_block_start``) into ``plan.dst_blocks`` of the peer pool;
        write ``aux`` into the aux record of the first destination block
        when given.  Returns once the data is visible to the peer."""

    def close_peer(self, peer: PeerPool) -> None:
        peer.close()

    def close(self) -> None:
        pass
