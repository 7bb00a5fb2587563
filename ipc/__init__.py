"""Same-host mechanics the transports use: sealed shared-memory segments
(memfd), the shm control ring and channel, the Unix-socket handshake
(credentials checked, fds passed), CUDA IPC pools and handles (with their
per-process cache)."""

if __name__ == "embresume.ipc":
    from embresume.ipc.shm import ShmBacking, ShmSegment
    from embresume.ipc.ring import RingClosed, RingTimeout, ShmRing

    __all__ = ["ShmBacking", "ShmSegment", "ShmRing", "RingClosed", "RingTimeout"]
else:
    # imported by its folder's bare name from the repository root: define nothing
    __all__ = []
