"""Same-host machinery: POSIX shm segments, the shm control ring, the shm
transport (CPU pools) and CUDA IPC handles (GPU pools)."""

from .shm import ShmBacking, ShmSegment, unlink_segment
from .ring import RingClosed, RingTimeout, ShmRing

__all__ = ["ShmBacking", "ShmSegment", "ShmRing", "RingClosed", "RingTimeout", "unlink_segment"]
