"""Exception hierarchy of embresume, and the codes that say why a request failed."""

from __future__ import annotations

import enum


class FailCode(enum.IntEnum):
    """Why a request failed or was refused: a STATUS carries it on the wire
    (``protocol.StatusMsg.code``, next to ``flags``), the language endpoint
    keeps it (:meth:`~embresume.LanguageEndpoint.failure_code`) and
    :class:`TransferFailed` carries it (``.code``).  Code acts on these values;
    the ``reason`` text beside them is for people and may be reworded.  The
    table (who sends each, what the receiver does) is in docs/design.md,
    "Refusal codes"."""

    #: not a failure (a Transferring or Success STATUS)
    NONE = 0
    #: failed, with no more specific code (a peer's Failed that named none)
    ERROR = 1
    #: encoder: the room is already being sent to its ranks (Transferring or
    #: Success, or it has all the ranks it asked for): ask again when it ended
    BUSY = 2
    #: encoder: the room belongs to another TP group (another engine
    #: instance's ranks asked for it first): ask again when it ended
    TP_GROUP = 3
    #: encoder: it let go of the item (withdrawn, or nobody asked for it
    #: within request_timeout); it will not come unless it is sent again
    NOT_PUBLISHED = 4
    #: encoder: the INIT or RESUME was malformed (block index out of range,
    #: block size, session, sent_tokens, a resume of a room it does not hold)
    BAD_REQUEST = 5
    #: encoder: the room's ranks disagree on required_dst_info_num
    RANKS_DISAGREE = 6
    #: encoder: the embedding's width or dtype is not the rank's pool's
    LAYOUT_MISMATCH = 7
    #: encoder: a per-session bound (live rooms, unanswered blocks) was hit
    BOUND = 8
    #: either side: aborted (by the caller, a rank, or confirmed by the encoder)
    ABORTED = 9
    #: either side: no progress within request_timeout
    TIMEOUT = 10
    #: either side: the peer (a rank of the room, or the encoder) is gone
    PEER_LOST = 11
    #: encoder: a write into the rank's blocks failed
    WRITE_FAILED = 12
    #: either side: the endpoint was closed
    CLOSED = 13
    #: language side: the encoder could not be reached (handshake, send)
    UNREACHABLE = 14
    #: language side: the encoder's message for the room was invalid
    BAD_MESSAGE = 15
    #: language side: copying a chunk out of the pool failed
    COPY_FAILED = 16


class EmbResumeError(Exception):
    """Base class of every error raised by embresume."""


class ConfigError(EmbResumeError, ValueError):
    """A configuration value is missing, malformed or out of range."""


class NoMemory(ConfigError):
    """A pool or shared segment does not fit in the memory available (the
    message names the size, what is available and how to make it fit)."""


class InvalidArgument(EmbResumeError, ValueError):
    """A caller passed a bad argument (room key, token count, rank count, shape, ...).

    Raised at the call, before anything is allocated or sent."""


class RoomInUse(InvalidArgument):
    """``request`` for a room whose previous request on this endpoint has not
    ended yet: still in flight, its failed copy still being released, or its
    abort not yet confirmed by the encoder.  Transient: asking again shortly works."""


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


class BindFailed(PeerError):
    """An endpoint could not bind its address (in use, not this host's, ...)."""


class TransportUnavailable(TransferError):
    """A transport cannot serve this pair of endpoints (no CUDA IPC between
    these processes, a library missing, ...): the handshake falls back to the
    next transport both sides allow."""


class ResultReleased(EmbResumeError, RuntimeError):
    """An :class:`~embresume.merge.EmbeddingResult`'s tensors were read after
    ``release()`` handed its memory back."""


class TransferFailed(EmbResumeError, RuntimeError):
    """A request ended in the ``Failed`` status.  ``room`` names the request,
    ``code`` (a :class:`FailCode`) says why, ``reason`` says it to people.
    :meth:`of` picks the subclass of a code (:class:`RoomBusy`,
    :class:`NotPublished`); ``except TransferFailed`` catches them all."""

    #: the code of an instance made without one
    default_code = FailCode.ERROR

    def __init__(self, room, reason: str, code: "FailCode | int | None" = None):
        super().__init__(f"room {room} failed: {reason}")
        self.room = room
        self.reason = reason
        self.code = self.default_code if code is None else FailCode(code)

    @staticmethod
    def of(room, reason: str, code: "FailCode | int") -> "TransferFailed":
        """The exception for a failure with ``code``: the subclass that code
        has (RoomBusy, NotPublished), else TransferFailed itself."""
        return _BY_CODE.get(code, TransferFailed)(room, reason, code)


class RoomBusy(TransferFailed):
    """The encoder refused the request because the room is being sent to
    other ranks right now (``FailCode.BUSY``) or belongs to another TP group
    (``FailCode.TP_GROUP``): asking again once that ended may succeed."""

    default_code = FailCode.BUSY


class NotPublished(TransferFailed):
    """The encoder let go of the item (withdrawn, or nobody asked for it in
    time; ``FailCode.NOT_PUBLISHED``): it will not come unless sent again, so
    compute it elsewhere instead of waiting."""

    default_code = FailCode.NOT_PUBLISHED


#: the subclass of TransferFailed each code that has one is raised as
_BY_CODE = {FailCode.BUSY: RoomBusy, FailCode.TP_GROUP: RoomBusy, FailCode.NOT_PUBLISHED: NotPublished}
