"""Same-host mechanics the transports use: POSIX shm segments, the shm control
ring and channel, CUDA IPC pools and handles (with their per-process cache)."""

from embresume.ipc.shm import ShmBacking, ShmSegment, unlink_segment
from embresume.ipc.ring import RingClosed, RingTimeout, ShmRing

__all__ = ["ShmBacking", "ShmSegment", "ShmRing", "RingClosed", "RingTimeout", "unlink_segment"]
