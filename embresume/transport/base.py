"""The data-plane interface every transport implements.

Lifecycle (NIXL-style: register -> exchange metadata -> transfer -> close)::

    language endpoint                               encoder
    -----------------                               -------
    pool = BlockPool(layout, cls.create_backing(..))   (ONE pool per endpoint)
    desc = t.export_pool(pool)  --- handshake --->  peer = t.open_peer(desc)   # once per peer pool
      (once per transport instance,                 t.write_chunk(peer, src, plan, aux)
       whatever the number of encoders)
                                <-- STATUS ------   (posted only after write_chunk returned)
    t.unexport_pool(pool)                           t.close_peer(peer)
    t.close()                                       t.close()

``write_chunk`` is synchronous: when it returns, the bytes are visible to the
peer (CPU stores done, CUDA kernel completed, Mooncake write acknowledged), so
the encoder may post the chunk's status.  If it raises, the destination
blocks may still be written later (a timed-out RDMA write): the language side
must not hand them to another request until the connection is torn down or
the peer confirmed.

The endpoints never name a transport.  What they need to know they ask the
class (capabilities) or the instance:

* :attr:`Transport.same_host_only` -- usable only when both endpoints share a
  node (shared memory, CUDA IPC): only peers whose handshake came over the
  encoder's Unix socket (:mod:`embresume.ipc.unix`, kernel-checked
  credentials, fds passed) may use them.  The control channel follows the
  handshake, not the transport: the shm ring pair after a Unix-socket
  handshake, ZeroMQ after a tcp one;
* :attr:`Transport.pool_devices` -- the device types of receive pools it can
  carry; :meth:`Transport.create_backing` makes the memory of a pool it can
  export (the language endpoint asks the most specific transport allowed);
* :meth:`Transport.can_export` -- whether an existing pool can be exported;
* :meth:`Transport.instance_key` / :meth:`Transport.create` -- how instances
  are shared (Mooncake: one per local interface, chosen from the peer's
  address; the others: one per process side);
* :meth:`Transport.peer_host` -- where the peer of a pool description is
  (the encoder's side of the same choice);
* :class:`~embresume.errors.TransportUnavailable` -- raised by
  ``create_backing``, ``export_pool`` or ``open_peer`` when this pair of
  processes cannot use the transport: the handshake then falls back to the
  next transport both sides allow.

Everything above this interface (allocator, protocol, planner, merge,
endpoints) is transport-agnostic.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Hashable, Optional

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
    #: both endpoints must share a node (same host, PID/IPC namespaces as required)
    same_host_only: ClassVar[bool] = False
    #: device types ("cpu", "cuda") of receive pools this transport can carry
    pool_devices: ClassVar[tuple[str, ...]] = ("cpu",)
    #: worth splitting a chunk into pieces whose PROGRESS lets the receiver
    #: copy out earlier pieces while later ones are written (CPU-driven copies)
    pipelined: bool = False

    # ------------------------------------------------------ discovery
    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        """Why this transport cannot run in this process (None when it can)."""
        return None

    @classmethod
    def instance_key(cls, config, peer_host: Optional[str]) -> Hashable:
        """Instances with equal keys are shared by the connections of one endpoint."""
        return cls.name

    @classmethod
    def create(cls, config, peer_host: Optional[str]) -> "Transport":
        """A new instance for ``config``; ``peer_host`` is where the peer is."""
        return cls()

    @classmethod
    def peer_host(cls, desc: dict) -> Optional[str]:
        """Encoder side: the host a pool description comes from (None: unknown)."""
        return None

    # ------------------------------------------------------ language side
    @classmethod
    def create_backing(cls, nbytes: int, device: str, prefault: bool = True):
        """Memory for a receive pool this transport (and others) can export."""
        from ..blocks import TorchBacking
        return TorchBacking(nbytes, device)

    def can_export(self, pool: BlockPool) -> bool:
        return pool.device.type in self.pool_devices

    @abc.abstractmethod
    def export_pool(self, pool: BlockPool) -> dict:
        """Make ``pool`` writable by peers; return a JSON-able description.
        Called once per pool and instance, however many peers open it.  An fd
        the peer needs goes in as :class:`embresume.ipc.unix.Fd` (passed over
        the Unix-socket handshake; ``open_peer`` gets the received fd, valid
        during the call only)."""

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
        write ``aux`` (int32 ``[<= aux_ints]``: a host numpy array from
        :func:`~embresume.source.aux_record`, or a tensor) into the aux record
        of the first destination block when given.  Returns once the data is visible to the peer."""

    def close_peer(self, peer: PeerPool) -> None:
        peer.close()

    def close(self) -> None:
        pass
