"""Exception hierarchy of embresume."""

from __future__ import annotations


class EmbResumeError(Exception):
    """Base class of every error raised by embresume."""


class ConfigError(EmbResumeError, ValueError):
    """A configuration value is missing, malformed or out of range."""


class InvalidArgument(EmbResumeError, ValueError):
    """A caller passed a bad argument (room key, token count, rank count, shape, ...).

    Raised at the call, before anything is allocated or sent."""


class UnknownRoom(InvalidArgument, KeyError):
    """No request (or no uncollected result) for that room on this endpoint."""

    def __str__(self) -> str:          # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class EmbResumeTimeout(EmbResumeError, TimeoutError):
    """A bounded wait ran out (``recv``, ``wait``, ``drain``, a handshake)."""


class ProtocolError(EmbResumeError, ValueError):
    """A control message is malformed.  ``field`` names the offending field."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"protocol error in field {field!r}: {reason}")
        self.field = field
        self.reason = reason


class AllocatorError(EmbResumeError, RuntimeError):
    """Invalid use of the block allocator (double free, foreign block, ...)."""


class BlockSizeMismatch(EmbResumeError, ValueError):
    """``allocated_tokens // len(dst_blocks)`` does not equal the block size."""


class TransferError(EmbResumeError, RuntimeError):
    """A data transfer failed."""


class PeerError(EmbResumeError, ConnectionError):
    """The peer is dead, unreachable or did not answer in time."""


class TransportUnavailable(TransferError):
    """A transport cannot serve this pair of endpoints (no CUDA IPC between
    these processes, a library missing, ...): the handshake falls back to the
    next transport both sides allow."""


class ResultReleased(EmbResumeError, RuntimeError):
    """An :class:`~embresume.merge.EmbeddingResult`'s tensors were read after
    ``release()`` handed its memory back."""


class TransferFailed(EmbResumeError, RuntimeError):
    """A request ended in the ``Failed`` status.  ``room`` names the request."""

    def __init__(self, room, reason: str):
        super().__init__(f"room {room} failed: {reason}")
        self.room = room
        self.reason = reason
