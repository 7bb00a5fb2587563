import struct

import pytest
from hypothesis import given, settings, strategies as st

from embresume import protocol as P
from embresume.errors import ProtocolError
from embresume.status import ALLOWED, InvalidTransition, Status, StatusTracker, check_transition

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
text = st.text(max_size=50)
blocks = st.lists(u32, min_size=1, max_size=300, unique=True).map(tuple)
#: int keys take the codec's fast paths, str and bytes keys its field-by-field code
rooms = st.one_of(u64, st.text(max_size=20), st.binary(max_size=20))
codes = st.sampled_from(list(P.FailCode))

messages = st.one_of(
    st.builds(P.Init, u64, text, u32, text, blocks, st.integers(1, 65535), st.integers(1, 2**64 - 1)),
    st.builds(P.Resume, u64, text, u32, text, blocks, st.integers(1, 65535), st.integers(1, 2**64 - 1),
              st.integers(1, 2**64 - 1)),
    st.builds(P.StatusMsg, rooms, st.sampled_from([Status.Bootstrapping, Status.WaitingForInput]),
              u32, u64, u32, u64, text, st.integers(0, 255)),
    # a Failed carries its code (any FailCode), next to the flags
    st.builds(P.StatusMsg, rooms, st.just(Status.Failed), u32, u64, u32, u64, text, st.integers(0, 255), codes),
    st.builds(lambda room, total, sent, st_: P.StatusMsg(room, st_, 1, min(sent, total), 5, total),
              rooms, u64, u64, st.sampled_from([Status.Transferring, Status.Success])),
    st.builds(P.Abort, u64, text),
    st.builds(P.Heartbeat, u64, u64),
    st.builds(P.Bye, text),
    st.builds(P.Progress, u64, st.integers(1, 2**32 - 1), st.integers(1, 2**32 - 1)),
    st.builds(P.Register, st.sampled_from(list(P.Role)), text, text, u32, st.integers(0, 65535), text,
              st.dictionaries(st.text(max_size=8), st.one_of(st.integers(-5, 5), text), max_size=5)),
)


@settings(max_examples=300, deadline=None)
@given(messages)
def test_round_trip(msg):
    out = P.decode(P.encode(msg))
    assert out == msg
    if isinstance(msg, P.StatusMsg):
        assert type(out.code) is P.FailCode and out.code == msg.code


def _status_frame(code: int, status: Status = Status.Failed, room=7) -> bytes:
    """A STATUS frame whose code byte is ``code`` (whatever the encoder would allow)."""
    raw = bytearray(P.encode(P.StatusMsg(room, status, 1, 0, 0, 0, "why", P.FLAG_ABORT_ACK)))
    i = raw.index(bytes([P.FLAG_ABORT_ACK, 0]) + (3).to_bytes(2, "little") + b"why")
    raw[i + 1] = code                    # the byte after flags
    return bytes(raw)


@pytest.mark.parametrize("room", [7, "str-key", b"bytes-key"])     # the fast path and the field-by-field one
def test_status_code_is_validated_on_decode(room):
    for code in P.FailCode:
        assert P.decode(_status_frame(int(code), room=room)).code is code
    known = {int(c) for c in P.FailCode}
    for bad in (max(known) + 1, 200, 255):
        with pytest.raises(ProtocolError) as e:
            P.decode(_status_frame(bad, room=room))           # a peer's unknown code is refused
        assert e.value.field == "code"
    # only a Failed says why: a code on any other status is a malformed message
    raw = bytearray(_status_frame(int(P.FailCode.BUSY), room=room))
    key_bytes = 9 if isinstance(room, int) else 3 + len(room)     # tag + u64, or tag + u16 length + bytes
    assert raw[8 + key_bytes] == Status.Failed
    raw[8 + key_bytes] = int(Status.WaitingForInput)
    with pytest.raises(ProtocolError) as e:
        P.decode(bytes(raw))
    assert e.value.field == "code"


def test_status_code_is_validated_on_encode():
    for room in (7, "k"):
        for msg in (P.StatusMsg(room, Status.Failed, code=99), P.StatusMsg(room, Status.Failed, code=True),
                    P.StatusMsg(room, Status.WaitingForInput, code=P.FailCode.TIMEOUT)):
            with pytest.raises(ProtocolError) as e:
                P.encode(msg)
            assert e.value.field == "code"
        # a plain int that is a known code is taken, and comes back as the FailCode
        assert P.decode(P.encode(P.StatusMsg(room, Status.Failed, code=4))).code is P.FailCode.NOT_PUBLISHED


def test_version_is_bumped_for_the_status_code():
    # version 3: STATUS carries the code; a version-2 peer's frame is refused by name
    assert P.VERSION == 3
    raw = bytearray(P.encode(P.StatusMsg(1, Status.Failed, code=P.FailCode.BUSY)))
    raw[4] = 2
    with pytest.raises(ProtocolError) as e:
        P.decode(bytes(raw))
    assert e.value.field == "version"


@settings(max_examples=300, deadline=None)
@given(messages, st.data())
def test_truncation_and_trailing_bytes_rejected(msg, data):
    raw = P.encode(msg)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(ProtocolError):
        P.decode(raw[:cut])
    with pytest.raises(ProtocolError, match="trailing"):
        P.decode(raw + b"\0")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_crashes(data):
    try:
        P.decode(data)
    except ProtocolError:
        pass


def _init(**kw):
    f = dict(room=1, endpoint="h", dst_port=0, session_id="s", dst_blocks=(1, 2), required_dst_info_num=1,
             allocated_tokens=256)
    f.update(kw)
    return P.Init(**f)


@pytest.mark.parametrize("mutate, field", [
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: b[:4] + bytes([99]) + b[5:], "version"),
    (lambda b: b[:5] + bytes([200]) + b[6:], "kind"),
])
def test_header_errors_name_the_field(mutate, field):
    with pytest.raises(ProtocolError) as e:
        P.decode(mutate(P.encode(_init())))
    assert e.value.field == field


def test_field_errors_name_the_field():
    with pytest.raises(ProtocolError) as e:
        P.decode(P.encode(_init(dst_blocks=(1, 1))))
    assert e.value.field == "dst_blocks"
    raw = bytearray(P.encode(_init(dst_blocks=(3, 4))))
    raw[-4:] = struct.pack("<I", 3)
    with pytest.raises(ProtocolError) as e:
        P.decode(bytes(raw))
    assert e.value.field == "dst_blocks"
    with pytest.raises(ProtocolError) as e:
        P.encode(_init(room=-1))
    assert e.value.field == "room"
    with pytest.raises(ProtocolError) as e:
        P.decode(P.encode(_init(required_dst_info_num=0)))
    assert e.value.field == "required_dst_info_num"
    bad_status = bytearray(P.encode(P.StatusMsg(1, Status.Success, 1, 1, 1, 1)))
    bad_status[8 + 1 + 8] = 9          # header, key tag, u64 room, then the status byte
    with pytest.raises(ProtocolError) as e:
        P.decode(bytes(bad_status))
    assert e.value.field == "status"
    with pytest.raises(ProtocolError) as e:
        P.decode(P.encode(P.Register(P.Role.ENCODER, "s", "n", 1, desc={})).replace(b"{}", b"[]"))
    assert e.value.field == "desc"


def test_status_table():
    assert Status.Transferring in ALLOWED[Status.Transferring]   # any number of resumes
    for terminal in (Status.Success, Status.Failed):
        assert not ALLOWED[terminal]
    for s in Status:
        if not s.terminal:
            check_transition(s, Status.Failed)
    with pytest.raises(InvalidTransition):
        check_transition(Status.Bootstrapping, Status.Success)
    t = StatusTracker()
    for s in (Status.WaitingForInput, Status.Transferring, Status.Transferring, Status.Success):
        t.set(s)
    assert not t.fail()
    assert t.history[-1] is Status.Success and len(t.history) == 5
