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

messages = st.one_of(
    st.builds(P.Init, u64, text, u32, text, blocks, st.integers(1, 65535), st.integers(1, 2**64 - 1)),
    st.builds(P.Resume, u64, text, u32, text, blocks, st.integers(1, 65535), st.integers(1, 2**64 - 1),
              st.integers(1, 2**64 - 1)),
    st.builds(P.StatusMsg, u64, st.sampled_from([Status.Failed, Status.Bootstrapping, Status.WaitingForInput]),
              u32, u64, u32, u64, text, st.integers(0, 255)),
    st.builds(lambda room, total, sent, st_: P.StatusMsg(room, st_, 1, min(sent, total), 5, total),
              u64, u64, u64, st.sampled_from([Status.Transferring, Status.Success])),
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
    assert P.decode(P.encode(msg)) == msg


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
