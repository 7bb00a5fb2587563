"""Control messages and their compact binary codec (no pickle).

Every frame starts with an 8-byte header::

    0        4        5       6          8
    +--------+--------+-------+----------+-------------------------+
    | "EMBR" | version| kind  | reserved | body (little endian)    |
    +--------+--------+-------+----------+-------------------------+

Bodies (``str`` = u16 length + UTF-8, ``blob`` = u32 length + UTF-8 JSON,
``u32[]`` = u32 count + items, ``key`` = a room key, see below):

    REGISTER  role u8, tp_rank u16, pid u32, session_id str, node_id str, transport str, desc blob
    INIT      room key, nonce u64, dst_port u32, required_dst_info_num u16, allocated_tokens u64,
              endpoint str, session_id str, dst_blocks u32[]
    RESUME    INIT's fields + sent_tokens u64
    STATUS    room key, status u8, seq u32, sent_tokens u64, chunk_tokens u32, total_tokens u64, flags u8,
              code u8, reason str
    ABORT     room key, reason str
    HEARTBEAT seq u64, time_ns u64
    BYE       reason str
    PROGRESS  room key, seq u32, landed u32     (tokens of chunk ``seq`` already written, whole blocks)

Room keys: serving stacks key items by request id or multimodal hash, so a
room is an int (``0 <= room < 2**64``), a str (UTF-8, at most 256 bytes) or
bytes (at most 256)::

    key  =  tag u8 (0 int, 1 str, 2 bytes), then u64 (int) or u16 length + bytes

A STATUS's ``code`` (a :class:`FailCode`) says why a ``Failed`` failed or
was refused (NONE on any other status): receivers act on it, never on the
``reason`` text, which is for people.  An unknown code, or a code on a
status other than Failed, is a :class:`ProtocolError`.

``nonce`` identifies one request attempt of one language endpoint: a replayed
INIT (same session, room and nonce) is a duplicate, a new nonce for a room
that finished earlier is a new use of the key.

:func:`decode` validates every field and raises :class:`ProtocolError` naming
the first bad one; it never returns a partially valid message.
"""

from __future__ import annotations

import enum
import json
import struct
from array import array
from dataclasses import dataclass, field
from typing import Union

# FailCode (the STATUS code) is defined beside the exceptions that carry it: protocol.FailCode is the same
from .errors import FailCode, InvalidArgument, ProtocolError
from .status import Status

MAGIC = b"EMBR"
#: 3: STATUS carries ``code`` (a FailCode) after ``flags``
VERSION = 3
MAX_BLOCKS = 1 << 20
MAX_STR = 4096
MAX_BLOB = 1 << 20
MAX_KEY = 256
#: JSON nesting accepted in a handshake description
MAX_JSON_DEPTH = 32

_HDR = struct.Struct("<4sBBH")


class Kind(enum.IntEnum):
    REGISTER = 1
    INIT = 2
    RESUME = 3
    STATUS = 4
    ABORT = 5
    HEARTBEAT = 6
    BYE = 7
    PROGRESS = 8


class Role(enum.IntEnum):
    ENCODER = 0
    LANGUAGE = 1


@dataclass(frozen=True)
class Register:
    role: Role
    session_id: str
    node_id: str
    pid: int
    tp_rank: int = 0
    transport: str = ""
    desc: dict = field(default_factory=dict)


Room = Union[int, str, bytes]


@dataclass(frozen=True)
class Init:
    room: Room
    endpoint: str
    dst_port: int
    session_id: str
    dst_blocks: tuple[int, ...]
    required_dst_info_num: int
    allocated_tokens: int
    nonce: int = 0


@dataclass(frozen=True)
class Resume:
    room: Room
    endpoint: str
    dst_port: int
    session_id: str
    dst_blocks: tuple[int, ...]
    required_dst_info_num: int
    allocated_tokens: int
    sent_tokens: int
    nonce: int = 0


#: STATUS flag: a write into the receiver's blocks failed or timed out and may
#: still land; the blocks must not be reused until the connection is torn down
FLAG_BLOCKS_UNSAFE = 1
#: STATUS flag: this Failed answers the receiver's ABORT (nothing more will be
#: written for that attempt); it never fails a newer request for the same room
FLAG_ABORT_ACK = 2


@dataclass(frozen=True)
class StatusMsg:
    room: Room
    status: Status
    seq: int = 0
    sent_tokens: int = 0
    chunk_tokens: int = 0
    total_tokens: int = 0
    reason: str = ""
    flags: int = 0
    #: why a Failed failed (:class:`FailCode`); NONE on any other status
    code: FailCode = FailCode.NONE


@dataclass(frozen=True)
class Abort:
    room: Room
    reason: str = ""


@dataclass(frozen=True)
class Heartbeat:
    seq: int
    time_ns: int


@dataclass(frozen=True)
class Bye:
    reason: str = ""


@dataclass(frozen=True)
class Progress:
    """Part of a chunk has landed: the receiver may start copying it out
    while the rest is still being written (pipelined chunks)."""

    room: Room
    seq: int
    landed: int


Message = Union[Register, Init, Resume, StatusMsg, Abort, Heartbeat, Bye, Progress]

_U8, _U16, _U32, _U64 = (struct.Struct(f"<{c}") for c in "BHIQ")
_LIMITS = {"B": 0xFF, "H": 0xFFFF, "I": 0xFFFFFFFF, "Q": 0xFFFFFFFFFFFFFFFF}


# ---------------------------------------------------------------- encoding
class _Writer:
    __slots__ = ("parts",)

    def __init__(self, kind: Kind):
        self.parts = [_HDR.pack(MAGIC, VERSION, int(kind), 0)]

    def num(self, name: str, fmt: str, v) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _LIMITS[fmt]:
            raise ProtocolError(name, f"{v!r} does not fit an unsigned {struct.calcsize(fmt) * 8}-bit field")
        self.parts.append(struct.pack("<" + fmt, v))

    def str(self, name: str, s: str) -> None:
        if not isinstance(s, str):
            raise ProtocolError(name, f"expected str, got {type(s).__name__}")
        b = s.encode()
        if len(b) > MAX_STR:
            raise ProtocolError(name, f"{len(b)} bytes exceeds {MAX_STR}")
        self.parts += [_U16.pack(len(b)), b]

    def key(self, name: str, room) -> None:
        check_room(room, ProtocolError, name)
        if isinstance(room, int):
            self.parts += [_U8.pack(KEY_INT), _U64.pack(room)]
        else:
            b = room.encode() if isinstance(room, str) else bytes(room)
            self.parts += [_U8.pack(KEY_STR if isinstance(room, str) else KEY_BYTES), _U16.pack(len(b)), b]

    def blob(self, name: str, obj) -> None:
        try:
            b = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
        except (TypeError, ValueError) as e:
            raise ProtocolError(name, f"not JSON-serialisable: {e}") from None
        if len(b) > MAX_BLOB:
            raise ProtocolError(name, f"{len(b)} bytes exceeds {MAX_BLOB}")
        self.parts += [_U32.pack(len(b)), b]

    def blocks(self, name: str, blocks) -> None:
        try:
            a = array("I", blocks)
        except (OverflowError, TypeError) as e:
            raise ProtocolError(name, f"block indices must be u32: {e}") from None
        if len(a) > MAX_BLOCKS:
            raise ProtocolError(name, f"{len(a)} blocks exceeds {MAX_BLOCKS}")
        self.parts += [_U32.pack(len(a)), a.tobytes()]

    def bytes(self) -> bytes:
        return b"".join(self.parts)


KEY_INT, KEY_STR, KEY_BYTES = 0, 1, 2


def check_room(room, error=None, name: str = "room") -> None:
    """Validate a room key; raises ``error`` (default
    :class:`~embresume.errors.InvalidArgument`) with a clear message."""
    if error is None:
        error = InvalidArgument
    msg = None
    if isinstance(room, bool):
        msg = "a room key is an int, str or bytes, not a bool"
    elif isinstance(room, int):
        if not 0 <= room <= _LIMITS["Q"]:
            msg = f"int room keys must be in [0, 2**64), got {room}"
    elif isinstance(room, str):
        try:
            n = len(room.encode())
        except UnicodeEncodeError:
            n, msg = 0, "str room keys must be valid UTF-8 (no lone surrogates)"
        if n > MAX_KEY:
            msg = f"str room keys are at most {MAX_KEY} bytes of UTF-8, got {n}"
    elif isinstance(room, (bytes, bytearray, memoryview)):
        if len(room) > MAX_KEY:
            msg = f"bytes room keys are at most {MAX_KEY} bytes, got {len(room)}"
    else:
        msg = f"a room key is an int, str or bytes, got {type(room).__name__}"
    if msg is not None:
        if error is ProtocolError:
            raise ProtocolError(name, msg)
        raise error(msg)


# ---------------------------------------------------------------- fast paths
# INIT, RESUME and STATUS with int room keys (the hot messages) are packed and
# unpacked with precompiled structs.  Anything else -- str/bytes keys, a wrong
# type, an out-of-range value, a malformed frame -- falls back to the
# field-by-field code below, which raises the precise ProtocolError: the fast
# paths never accept a message or a frame that the slow path rejects.
_INIT_FIXED = struct.Struct("<BQQIHQ")        # key tag, room, nonce, dst_port, required_dst_info_num, allocated
_STATUS_FIXED = struct.Struct("<BQBIQIQBBH")  # key tag, room, status, seq, sent, chunk, total, flags, code,
#                                               len(reason)
_STATUS_BY_VALUE = {int(s): s for s in Status}
_CODE_BY_VALUE = {int(c): c for c in FailCode}
_HDR_BYTES = {int(k): _HDR.pack(MAGIC, VERSION, int(k), 0) for k in Kind}


def _enc_init(msg) -> "bytes | None":
    room, nonce, port, req, alloc = msg.room, msg.nonce, msg.dst_port, msg.required_dst_info_num, msg.allocated_tokens
    ep, sess = msg.endpoint, msg.session_id
    resume = type(msg) is Resume
    if not (type(room) is int and type(nonce) is int and type(port) is int and type(req) is int
            and type(alloc) is int and type(ep) is str and type(sess) is str):
        return None
    try:
        epb, sb = ep.encode(), sess.encode()
        a = array("I", msg.dst_blocks)
        if len(epb) > MAX_STR or len(sb) > MAX_STR or len(a) > MAX_BLOCKS:
            return None
        parts = [_HDR_BYTES[Kind.RESUME if resume else Kind.INIT],
                 _INIT_FIXED.pack(KEY_INT, room, nonce, port, req, alloc),
                 _U16.pack(len(epb)), epb, _U16.pack(len(sb)), sb, _U32.pack(len(a)), a.tobytes()]
        if resume:
            if type(msg.sent_tokens) is not int:
                return None
            parts.append(_U64.pack(msg.sent_tokens))
        return b"".join(parts)
    except (struct.error, OverflowError, TypeError, ValueError, UnicodeError):
        return None


def _check_code(status, code) -> FailCode:
    """A STATUS's code: a known :class:`FailCode`, and NONE unless the status is Failed."""
    c = _CODE_BY_VALUE.get(code) if isinstance(code, int) and not isinstance(code, bool) else None
    if c is None:
        raise ProtocolError("code", f"unknown failure code {code!r}")
    if c is not FailCode.NONE and status != Status.Failed:
        raise ProtocolError("code", f"{c.name} on a {Status(status).name} status (only Failed has a code)")
    return c


def _enc_status(msg) -> "bytes | None":
    room, seq, sent, chunk, total, flags, code, reason = (msg.room, msg.seq, msg.sent_tokens, msg.chunk_tokens,
                                                          msg.total_tokens, msg.flags, msg.code, msg.reason)
    if not (type(room) is int and type(seq) is int and type(sent) is int and type(chunk) is int
            and type(total) is int and type(flags) is int and type(reason) is str):
        return None
    code = _CODE_BY_VALUE.get(code) if type(code) is FailCode or type(code) is int else None
    if code is None or (code and msg.status != Status.Failed):
        return None                       # the slow path names the bad field
    try:
        rb = reason.encode()
        if len(rb) > MAX_STR:
            return None
        return b"".join((_HDR_BYTES[Kind.STATUS], _STATUS_FIXED.pack(KEY_INT, room, int(msg.status), seq, sent,
                                                                     chunk, total, flags, code, len(rb)), rb))
    except (struct.error, OverflowError, TypeError, ValueError, UnicodeError):
        return None


_FAST_ENCODE = {Init: _enc_init, Resume: _enc_init, StatusMsg: _enc_status}


def encode(msg: Message) -> bytes:
    fast = _FAST_ENCODE.get(type(msg))
    if fast is not None:
        out = fast(msg)
        if out is not None:
            return out
    return _encode_slow(msg)


def _encode_slow(msg: Message) -> bytes:
    if isinstance(msg, Register):
        w = _Writer(Kind.REGISTER)
        w.num("role", "B", int(msg.role))
        w.num("tp_rank", "H", msg.tp_rank)
        w.num("pid", "I", msg.pid)
        w.str("session_id", msg.session_id)
        w.str("node_id", msg.node_id)
        w.str("transport", msg.transport)
        w.blob("desc", msg.desc)
    elif isinstance(msg, (Init, Resume)):
        w = _Writer(Kind.INIT if isinstance(msg, Init) else Kind.RESUME)
        w.key("room", msg.room)
        w.num("nonce", "Q", msg.nonce)
        w.num("dst_port", "I", msg.dst_port)
        w.num("required_dst_info_num", "H", msg.required_dst_info_num)
        w.num("allocated_tokens", "Q", msg.allocated_tokens)
        w.str("endpoint", msg.endpoint)
        w.str("session_id", msg.session_id)
        w.blocks("dst_blocks", msg.dst_blocks)
        if isinstance(msg, Resume):
            w.num("sent_tokens", "Q", msg.sent_tokens)
    elif isinstance(msg, StatusMsg):
        w = _Writer(Kind.STATUS)
        w.key("room", msg.room)
        w.num("status", "B", int(msg.status))
        w.num("seq", "I", msg.seq)
        w.num("sent_tokens", "Q", msg.sent_tokens)
        w.num("chunk_tokens", "I", msg.chunk_tokens)
        w.num("total_tokens", "Q", msg.total_tokens)
        w.num("flags", "B", msg.flags)
        w.num("code", "B", int(_check_code(msg.status, msg.code)))
        w.str("reason", msg.reason)
    elif isinstance(msg, Abort):
        w = _Writer(Kind.ABORT)
        w.key("room", msg.room)
        w.str("reason", msg.reason)
    elif isinstance(msg, Heartbeat):
        w = _Writer(Kind.HEARTBEAT)
        w.num("seq", "Q", msg.seq)
        w.num("time_ns", "Q", msg.time_ns)
    elif isinstance(msg, Bye):
        w = _Writer(Kind.BYE)
        w.str("reason", _truncate(msg.reason))
    elif isinstance(msg, Progress):
        w = _Writer(Kind.PROGRESS)
        w.key("room", msg.room)
        w.num("seq", "I", msg.seq)
        w.num("landed", "I", msg.landed)
    else:
        raise ProtocolError("kind", f"cannot encode {type(msg).__name__}")
    return w.bytes()


def _truncate(text: str, limit: int = MAX_STR) -> str:
    """At most ``limit`` bytes of UTF-8 (a reason must never make its message unencodable)."""
    if not isinstance(text, str):
        text = str(text)
    b = text.encode(errors="replace")
    if len(b) <= limit:
        return text
    return b[:limit - 3].decode(errors="ignore") + "..."


# ---------------------------------------------------------------- decoding
class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview, pos: int):
        self.buf, self.pos = buf, pos

    def _take(self, name: str, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise ProtocolError(name, f"truncated: needs {n} bytes at offset {self.pos}, frame has {len(self.buf)}")
        out = self.buf[self.pos:end]
        self.pos = end
        return out

    def num(self, name: str, st: struct.Struct) -> int:
        return st.unpack(self._take(name, st.size))[0]

    def str(self, name: str) -> str:
        n = self.num(name, _U16)
        if n > MAX_STR:
            raise ProtocolError(name, f"length {n} exceeds {MAX_STR}")
        try:
            return bytes(self._take(name, n)).decode()
        except UnicodeDecodeError:
            raise ProtocolError(name, "not valid UTF-8") from None

    def key(self, name: str):
        tag = self.num(name, _U8)
        if tag == KEY_INT:
            return self.num(name, _U64)
        if tag not in (KEY_STR, KEY_BYTES):
            raise ProtocolError(name, f"unknown key tag {tag}")
        n = self.num(name, _U16)
        if n > MAX_KEY:
            raise ProtocolError(name, f"key of {n} bytes exceeds {MAX_KEY}")
        raw = bytes(self._take(name, n))
        if tag == KEY_BYTES:
            return raw
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise ProtocolError(name, "str key is not valid UTF-8") from None

    def blob(self, name: str) -> dict:
        n = self.num(name, _U32)
        if n > MAX_BLOB:
            raise ProtocolError(name, f"length {n} exceeds {MAX_BLOB}")
        raw = bytes(self._take(name, n))
        if _json_depth(raw) > MAX_JSON_DEPTH:
            raise ProtocolError(name, f"JSON nested deeper than {MAX_JSON_DEPTH}")
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ProtocolError(name, "not valid JSON") from None
        if not isinstance(obj, dict):
            raise ProtocolError(name, "must be a JSON object")
        return obj

    def blocks(self, name: str) -> tuple[int, ...]:
        n = self.num(name, _U32)
        if n > MAX_BLOCKS:
            raise ProtocolError(name, f"count {n} exceeds {MAX_BLOCKS}")
        a = array("I")
        a.frombytes(self._take(name, 4 * n))
        return tuple(a)

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolError("frame", f"{len(self.buf) - self.pos} trailing bytes")


def _json_depth(raw: bytes) -> int:
    """Maximum bracket nesting of a JSON text (brackets inside strings count
    too: an over-estimate is fine for a bound, and it needs no parse)."""
    depth = best = 0
    for c in raw.translate(None, _NOT_BRACKETS):
        if c in b"[{":
            depth += 1
            if depth > best:
                best = depth
        else:
            depth -= 1
    return best


_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def _check_blocks(name: str, blocks: tuple[int, ...]) -> None:
    if not blocks:
        raise ProtocolError(name, "is empty")
    if len(set(blocks)) != len(blocks):
        raise ProtocolError(name, "contains duplicate block indices")


def _dec_status(buf):
    if len(buf) < 8 + _STATUS_FIXED.size:
        return None
    tag, room, st, seq, sent, chunk, total, flags, code, n = _STATUS_FIXED.unpack_from(buf, 8)
    end = 8 + _STATUS_FIXED.size + n
    status = _STATUS_BY_VALUE.get(st)
    code = _CODE_BY_VALUE.get(code)
    if tag != KEY_INT or end != len(buf) or n > MAX_STR or status is None or code is None:
        return None
    if code and status is not Status.Failed:
        return None
    if sent > total and status in (Status.Transferring, Status.Success):
        return None
    try:
        reason = bytes(buf[end - n:end]).decode() if n else ""
    except UnicodeDecodeError:
        return None
    return StatusMsg(room, status, seq, sent, chunk, total, reason, flags, code)


def _dec_init(buf):
    kind = buf[5]
    pos = 8 + _INIT_FIXED.size
    if len(buf) < pos + 2:
        return None
    tag, room, nonce, port, req, alloc = _INIT_FIXED.unpack_from(buf, 8)
    if tag != KEY_INT or req < 1 or alloc <= 0:
        return None
    try:
        n = _U16.unpack_from(buf, pos)[0]
        ep = bytes(buf[pos + 2:pos + 2 + n]).decode()
        pos += 2 + n
        m = _U16.unpack_from(buf, pos)[0]
        sess = bytes(buf[pos + 2:pos + 2 + m]).decode()
        pos += 2 + m
        nb = _U32.unpack_from(buf, pos)[0]
    except (struct.error, UnicodeDecodeError):
        return None
    pos += 4
    end = pos + 4 * nb
    tail = 8 if kind == Kind.RESUME else 0
    if n > MAX_STR or m > MAX_STR or not 0 < nb <= MAX_BLOCKS or end + tail != len(buf):
        return None
    a = array("I")
    a.frombytes(buf[pos:end])
    blocks = tuple(a)
    if len(set(blocks)) != nb:
        return None
    if kind == Kind.INIT:
        return Init(room, ep, port, sess, blocks, req, alloc, nonce)
    sent = _U64.unpack_from(buf, end)[0]
    if sent <= 0:
        return None
    return Resume(room, ep, port, sess, blocks, req, alloc, sent, nonce)


_FAST_DECODE = {int(Kind.INIT): _dec_init, int(Kind.RESUME): _dec_init, int(Kind.STATUS): _dec_status}


def decode(data) -> Message:
    buf = memoryview(data).cast("B")
    if len(buf) >= 8 and buf[4] == VERSION and buf[:4] == MAGIC:
        fast = _FAST_DECODE.get(buf[5])
        if fast is not None:
            msg = fast(buf)
            if msg is not None:
                return msg
    return _decode_slow(buf)


def _decode_slow(buf: memoryview) -> Message:
    if len(buf) < _HDR.size:
        raise ProtocolError("header", f"frame of {len(buf)} bytes is shorter than the {_HDR.size}-byte header")
    magic, version, kind, _ = _HDR.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ProtocolError("magic", f"{bytes(magic)!r} is not {MAGIC!r}")
    if version != VERSION:
        raise ProtocolError("version", f"peer speaks protocol version {version}, this side {VERSION}")
    try:
        kind = Kind(kind)
    except ValueError:
        raise ProtocolError("kind", f"unknown message kind {kind}") from None
    r = _Reader(buf, _HDR.size)
    if kind is Kind.REGISTER:
        role = r.num("role", _U8)
        try:
            role = Role(role)
        except ValueError:
            raise ProtocolError("role", f"unknown role {role}") from None
        msg = Register(role=role, tp_rank=r.num("tp_rank", _U16), pid=r.num("pid", _U32),
                       session_id=r.str("session_id"), node_id=r.str("node_id"),
                       transport=r.str("transport"), desc=r.blob("desc"))
    elif kind in (Kind.INIT, Kind.RESUME):
        room = r.key("room")
        nonce = r.num("nonce", _U64)
        dst_port = r.num("dst_port", _U32)
        req = r.num("required_dst_info_num", _U16)
        alloc = r.num("allocated_tokens", _U64)
        endpoint = r.str("endpoint")
        session = r.str("session_id")
        blocks = r.blocks("dst_blocks")
        if req < 1:
            raise ProtocolError("required_dst_info_num", "must be >= 1")
        if alloc <= 0:
            raise ProtocolError("allocated_tokens", "must be positive")
        _check_blocks("dst_blocks", blocks)
        if kind is Kind.INIT:
            msg = Init(room, endpoint, dst_port, session, blocks, req, alloc, nonce)
        else:
            sent = r.num("sent_tokens", _U64)
            if sent <= 0:
                raise ProtocolError("sent_tokens", "a resume must follow at least one sent chunk")
            msg = Resume(room, endpoint, dst_port, session, blocks, req, alloc, sent, nonce)
    elif kind is Kind.STATUS:
        room = r.key("room")
        st = r.num("status", _U8)
        try:
            st = Status(st)
        except ValueError:
            raise ProtocolError("status", f"unknown status {st}") from None
        msg = StatusMsg(room, st, seq=r.num("seq", _U32), sent_tokens=r.num("sent_tokens", _U64),
                        chunk_tokens=r.num("chunk_tokens", _U32), total_tokens=r.num("total_tokens", _U64),
                        flags=r.num("flags", _U8), code=_check_code(st, r.num("code", _U8)),
                        reason=r.str("reason"))
        if msg.sent_tokens > msg.total_tokens and msg.status in (Status.Transferring, Status.Success):
            raise ProtocolError("sent_tokens", f"{msg.sent_tokens} exceeds total_tokens {msg.total_tokens}")
    elif kind is Kind.ABORT:
        msg = Abort(r.key("room"), r.str("reason"))
    elif kind is Kind.HEARTBEAT:
        msg = Heartbeat(r.num("seq", _U64), r.num("time_ns", _U64))
    elif kind is Kind.PROGRESS:
        msg = Progress(r.key("room"), r.num("seq", _U32), r.num("landed", _U32))
        if msg.seq < 1:
            raise ProtocolError("seq", "chunks are numbered from 1")
        if msg.landed < 1:
            raise ProtocolError("landed", "a progress report needs at least one token")
    else:
        msg = Bye(r.str("reason"))
    r.end()
    return msg
