"""Refusal and failure codes: every Failed carries a FailCode, callers act on it.

* the encoder's room machine (no I/O) answers each refusal and failure with
  its code, and remembers (boundedly) the rooms whose embedding it let go of
  (withdrawn, expired): an INIT or RESUME for one is answered at once with
  Failed + NOT_PUBLISHED until the room is registered again;
* the language room machine keeps the encoder's code, or its own for local
  failures, and ``collect`` raises the code's exception (RoomBusy,
  NotPublished, TransferFailed);
* real endpoints: a withdrawn or expired item fails at once with
  NOT_PUBLISHED (instead of waiting as an empty room); a room being served to
  another TP group, or to all its ranks already, is refused with RoomBusy.
"""

from __future__ import annotations

import pytest
import torch

try:
    from prometheus_client import CollectorRegistry
except ImportError:              # without the metrics extra the machines count all the same
    def CollectorRegistry():     # noqa: N802
        return None

from embresume import NotPublished, RoomBusy, RoomInUse, TransferFailed
from embresume import protocol as P
from embresume.blocks import BlockLayout
from embresume.encoder import EncoderEndpoint
from embresume.errors import FailCode
from embresume.language import LanguageEndpoint
from embresume.metrics import EndpointStats
from embresume.rooms import encoder as RE
from embresume.rooms.encoder import EncoderRooms, Reject, Send, Session, Write
from embresume.rooms.language import Copy, LanguageRooms
from embresume.status import Status
from embresume.synthetic import SyntheticData

from conftest import make_config, wait_until

BS, HIDDEN, NB = 4, 8, 8
DTYPE = torch.bfloat16
TIMEOUT = 10.0


# ---------------------------------------------------------------- the encoder's machine
class Src:
    """What the machine reads of a registered embedding."""

    def __init__(self, total_tokens: int, hidden: int = HIDDEN):
        self.total_tokens, self.hidden, self.dtype, self.mrope_delta = total_tokens, hidden, DTYPE, 0


def session(sid: str, group: str = "g", num_blocks: int = NB) -> Session:
    return Session(sid, group, BlockLayout(num_blocks, BS, HIDDEN, DTYPE, 16), None, 0)


def init(s: Session, room, blocks=(0,), nonce=1, required=1, allocated=None) -> P.Init:
    blocks = tuple(blocks)
    return P.Init(room, "lang", 0, s.id, blocks, required, len(blocks) * BS if allocated is None else allocated,
                  nonce)


def resume(s: Session, room, blocks, sent, nonce=1) -> P.Resume:
    blocks = tuple(blocks)
    return P.Resume(room, "lang", 0, s.id, blocks, 1, len(blocks) * BS, sent, nonce)


def machine() -> EncoderRooms:
    return EncoderRooms(stats=EndpointStats("encoder", CollectorRegistry()), request_timeout=TIMEOUT)


def failed_to(acts: list, s: Session) -> list:
    """The Failed STATUS the actions tell ``s`` (posted, sent, or a refusal's)."""
    out = []
    for a in acts:
        msg = a.msg if isinstance(a, (Send, Reject)) else None
        if msg is not None and a.session is s and msg.status is Status.Failed:
            out.append(msg)
    return out


def code_to(acts: list, s: Session) -> FailCode:
    (msg,) = failed_to(acts, s)
    assert type(msg.code) is FailCode and msg.reason       # the text stays, for people
    return msg.code


def test_withdrawn_room_is_refused_at_once_with_not_published():
    m, s = machine(), session("s")
    m.register(1, Src(4), 0.0)
    assert m.withdraw(1) is not None
    acts = m.init(s, init(s, 1), 1.0)
    assert code_to(acts, s) is FailCode.NOT_PUBLISHED
    # told now, and no empty room is left waiting for an embedding that is gone
    assert 1 not in m.rooms and s.live_rooms == 0 and s.live_blocks == 0
    assert m.stats["not_published"] == 1 and m.stats["rejected"] == 1
    # a RESUME for it too
    assert code_to(m.resume(s, resume(s, 1, [0], 4), 1.0), s) is FailCode.NOT_PUBLISHED


def test_expired_room_is_refused_at_once_with_not_published():
    m, s, t = machine(), session("s"), session("t")
    m.register(1, Src(4), 0.0)
    m.register(2, Src(40), 0.0)
    (w,) = m.init(s, init(s, 2), 0.0)               # room 2 is being sent when it times out
    m.written(w.room, w.rank, w.plan, 1.0)
    acts = m.tick(TIMEOUT + 5.0)
    assert code_to(acts, s) is FailCode.TIMEOUT
    assert m.status(1) is Status.Failed and m.status(2) is Status.Failed
    for room in (1, 2):
        assert code_to(m.init(t, init(t, room), TIMEOUT + 6.0), t) is FailCode.NOT_PUBLISHED
    assert not m.rooms


def test_registering_again_clears_the_record():
    m, s = machine(), session("s")
    m.register(1, Src(4), 0.0)
    m.withdraw(1)
    assert code_to(m.init(s, init(s, 1, nonce=1), 1.0), s) is FailCode.NOT_PUBLISHED
    m.register(1, Src(4), 2.0)                      # published again
    acts = m.init(s, init(s, 1, nonce=2), 2.0)
    assert [type(a) for a in acts] == [Write] and not failed_to(acts, s)
    # expect(): the registration is on its way, an INIT that comes first waits for it
    m.written(acts[0].room, acts[0].rank, acts[0].plan, 2.0)
    m.register(3, Src(4), 3.0)
    m.withdraw(3)
    m.expect(3)
    assert m.init(s, init(s, 3, nonce=3), 3.0) == [] and 3 in m.rooms
    assert [type(a) for a in m.register(3, Src(4), 3.5)] == [Write]


def test_a_room_that_never_had_an_embedding_is_not_remembered():
    """A request that came before the data is legitimate: it waits, and after its
    timeout a new request waits again (nothing was let go of)."""
    m, s = machine(), session("s")
    assert m.init(s, init(s, 1, nonce=1), 0.0) == []
    assert code_to(m.tick(TIMEOUT + 1.0), s) is FailCode.TIMEOUT
    assert m.init(s, init(s, 1, nonce=2), TIMEOUT + 2.0) == [] and 1 in m.rooms
    # nor is a room delivered: a new nonce is a new use of the key (rule 4)
    m.register(2, Src(4), 0.0)
    (w,) = m.init(s, init(s, 2, blocks=[1], nonce=3), 0.0)
    m.written(w.room, w.rank, w.plan, 0.0)
    assert m.status(2) is Status.Success
    assert m.init(s, init(s, 2, blocks=[1], nonce=4), 0.0) == [] and 2 in m.rooms


def test_the_memory_of_rooms_let_go_is_bounded(monkeypatch):
    assert RE.NOT_PUBLISHED_MEMORY == 65536          # the documented value (docs/design.md, section 8)
    monkeypatch.setattr(RE, "NOT_PUBLISHED_MEMORY", 4)
    m, s = machine(), session("s", num_blocks=64)
    for room in range(6):
        m.register(room, Src(4), 0.0)
        m.withdraw(room)
    assert list(m.let_go) == [2, 3, 4, 5]            # the oldest forgotten first
    # a forgotten room waits again (the old behaviour); a remembered one is refused
    assert m.init(s, init(s, 0, [0]), 1.0) == [] and 0 in m.rooms
    assert code_to(m.init(s, init(s, 5, [1]), 1.0), s) is FailCode.NOT_PUBLISHED
    # withdrawing a remembered room again makes it the newest
    m.register(2, Src(4), 2.0)
    m.withdraw(2)
    m.register(6, Src(4), 2.0)
    m.withdraw(6)
    assert list(m.let_go) == [4, 5, 2, 6]


def test_every_failure_the_encoder_sends_has_its_code():
    # BUSY: the room is already being sent to all its ranks
    m, a, b = machine(), session("a"), session("b")
    m.register(1, Src(40), 0.0)
    m.init(a, init(a, 1), 0.0)
    assert code_to(m.init(b, init(b, 1), 0.0), b) is FailCode.BUSY            # more than required
    # TP_GROUP: another group's session, whatever it claims
    m, a, other = machine(), session("a", "A"), session("o", "B")
    m.init(a, init(a, 1, required=2), 0.0)
    assert code_to(m.init(other, init(other, 1, required=2), 0.0), other) is FailCode.TP_GROUP
    # BUSY: Transferring already
    m, a, b = machine(), session("a"), session("b")
    m.register(1, Src(40), 0.0)
    (w,) = m.init(a, init(a, 1), 0.0)
    m.written(w.room, w.rank, w.plan, 0.0)
    assert m.rooms[1].status is Status.Transferring
    assert code_to(m.init(b, init(b, 1), 0.0), b) is FailCode.BUSY
    # BAD_REQUEST: out of range, block size, another session's id, a resume of a room not held,
    # a new nonce while the rank still receives
    m, s = machine(), session("s")
    for bad in (init(s, 1, [NB]), init(s, 1, [0, 1], allocated=BS), init(session("x"), 1)):
        assert code_to(m.init(s, bad, 0.0), s) is FailCode.BAD_REQUEST
    assert code_to(m.resume(s, resume(s, 5, [0], 4), 0.0), s) is FailCode.BAD_REQUEST
    m.init(s, init(s, 2, nonce=1), 0.0)
    assert code_to(m.init(s, init(s, 2, nonce=2), 0.0), s) is FailCode.BAD_REQUEST
    # RANKS_DISAGREE: both ranks are told
    m, a, b = machine(), session("a"), session("b")
    m.init(a, init(a, 1, required=2), 0.0)
    acts = m.init(b, init(b, 1, required=3), 0.0)
    assert code_to(acts, a) is code_to(acts, b) is FailCode.RANKS_DISAGREE
    # LAYOUT_MISMATCH
    m, s = machine(), session("s")
    m.init(s, init(s, 1), 0.0)
    assert code_to(m.register(1, Src(4, hidden=2 * HIDDEN), 0.0), s) is FailCode.LAYOUT_MISMATCH
    # BOUND: the session's blocks
    m, s = machine(), session("s", num_blocks=2)
    m.init(s, init(s, 1, [0, 1]), 0.0)
    assert code_to(m.init(s, init(s, 2, [0]), 0.0), s) is FailCode.BOUND
    # ABORTED: the aborting rank's acknowledgement and the other rank's Failed
    m, a, b = machine(), session("a"), session("b")
    m.init(a, init(a, 1, required=2), 0.0)
    m.init(b, init(b, 1, required=2), 0.0)
    acts = m.abort(a, P.Abort(1, "no longer needed"))
    assert code_to(acts, a) is code_to(acts, b) is FailCode.ABORTED
    assert failed_to(acts, a)[0].flags & P.FLAG_ABORT_ACK
    assert code_to(m.abort(a, P.Abort(9, "x")), a) is FailCode.ABORTED          # nothing here: confirmed
    # WRITE_FAILED (and the blocks flagged unsafe)
    m, s = machine(), session("s")
    m.register(1, Src(4), 0.0)
    (w,) = m.init(s, init(s, 1), 0.0)
    acts = m.write_failed(w.room, w.rank, "rdma: timed out")
    assert code_to(acts, s) is FailCode.WRITE_FAILED and failed_to(acts, s)[0].flags & P.FLAG_BLOCKS_UNSAFE
    # PEER_LOST: the other ranks of its rooms
    m, a, b = machine(), session("a"), session("b")
    m.init(a, init(a, 1, required=2), 0.0)
    m.init(b, init(b, 1, required=2), 0.0)
    assert code_to(m.peer_lost(a, "gone"), b) is FailCode.PEER_LOST
    # CLOSED
    m, s = machine(), session("s")
    m.init(s, init(s, 1), 0.0)
    assert code_to(m.close(), s) is FailCode.CLOSED


def test_a_deferred_failed_keeps_its_code_when_an_abort_flags_it():
    """A Failed that waits for an in-flight write gets FLAG_ABORT_ACK from a later
    ABORT (rule 7) and keeps the code of the failure."""
    m, s = machine(), session("s")
    m.register(1, Src(4), 0.0)
    (w,) = m.init(s, init(s, 1), 0.0)
    assert not failed_to(m.tick(TIMEOUT + 1.0), s)          # the write is out: its Failed waits
    assert m.abort(s, P.Abort(1, "late")) == []
    (msg,) = failed_to(m.write_skipped(w.room, w.rank), s)
    assert msg.code is FailCode.TIMEOUT and msg.flags & P.FLAG_ABORT_ACK


# ---------------------------------------------------------------- the language machine
LBS = 128


class Lang:
    """The language endpoint's side of its machine (sends recorded, copies run at once)."""

    def __init__(self, **kw):
        opts = dict(default_allocate_tokens=256, request_timeout=10.0, quarantine_timeout=4.0)
        opts.update(kw)
        self.aux: dict = {}
        self.m = LanguageRooms(num_blocks=8, block_size=LBS, row_bytes=8, read_aux=lambda b: (self.aux.get(b, 0), None),
                               stats=EndpointStats("language", CollectorRegistry()), **opts)
        self.sent: list = []

    def run(self, acts):
        for a in acts:
            if type(a).__name__ == "Send":
                self.sent.append(a.msg)
            elif isinstance(a, Copy):
                self.run(self.m.copied(a.req, a.tokens, a.end, None, 0.0))

    def ask(self, room, address="e"):
        self.run(self.m.connected(address, "s1"))
        self.run(self.m.request(room, address, 1, None, 0.0))
        return self.sent[-1]


@pytest.mark.parametrize("code, exc", [(FailCode.BUSY, RoomBusy), (FailCode.TP_GROUP, RoomBusy),
                                       (FailCode.NOT_PUBLISHED, NotPublished), (FailCode.BOUND, TransferFailed),
                                       (FailCode.NONE, TransferFailed)])
def test_the_language_machine_keeps_the_encoders_code(code, exc):
    h = Lang()
    h.ask(1)
    h.run(h.m.status("e", P.StatusMsg(1, Status.Failed, reason="reworded at will", code=code), 0.0))
    req = h.m.reqs[1]
    want = code or FailCode.ERROR                   # a Failed that named no code
    assert req.tracker.status is Status.Failed and req.code is want
    with pytest.raises(exc) as e:
        h.m.collect(1)
    assert type(e.value) is exc and e.value.code is want and e.value.reason == "encoder: reworded at will"
    assert isinstance(e.value, TransferFailed)
    assert h.m.allocator.free_blocks == 8           # nothing parked: the encoder wrote nothing


def test_the_language_machines_own_failures_have_codes():
    h = Lang()
    h.ask(1)
    h.run(h.m.tick(100.0))
    assert h.m.reqs[1].code is FailCode.TIMEOUT
    h.ask(2)
    h.run(h.m.abort(2, "caller"))
    assert h.m.reqs[2].code is FailCode.ABORTED
    init = h.ask(3, "f")
    h.aux[init.dst_blocks[0]] = 10
    h.run(h.m.status("f", P.StatusMsg(3, Status.Success, 1, 10, 99, 10), 0.0))       # wrong chunk size
    assert h.m.reqs[3].code is FailCode.BAD_MESSAGE
    h.ask(4, "g")
    h.run(h.m.link_lost("g", "gone"))
    assert h.m.reqs[4].code is FailCode.PEER_LOST
    h.run(h.m.request(5, "down", 1, None, 0.0))
    h.run(h.m.connect_failed("down", "refused"))
    assert h.m.reqs[5].code is FailCode.UNREACHABLE
    h.ask(6, "k")
    h.run(h.m.close())
    assert h.m.reqs[6].code is FailCode.CLOSED
    with pytest.raises(TransferFailed) as e:
        h.m.collect(1)
    assert type(e.value) is TransferFailed and e.value.code is FailCode.TIMEOUT


def test_a_room_whose_previous_request_has_not_ended_is_room_in_use():
    h = Lang()
    h.ask(1)
    with pytest.raises(RoomInUse, match="in flight"):
        h.m.request(1, "e", 1, None, 0.0)
    h.run(h.m.abort(1, "caller"))                   # the abort is not confirmed yet
    with pytest.raises(TransferFailed):             # its failure collected: the room still waits
        h.m.collect(1)
    with pytest.raises(RoomInUse, match="confirm an abort"):
        h.m.request(1, "e", 1, None, 0.0)
    assert issubclass(RoomInUse, ValueError)        # an InvalidArgument, as before


# ---------------------------------------------------------------- real endpoints
ROOM_DATA = SyntheticData(256, "bf16", 4000, seed=11)


def _connected(enc, lang, room=999_999):
    """One delivered room: the handshake is done, what follows is the rooms' own answers."""
    lang.request(room)
    enc.send_tensors(room, *ROOM_DATA.sample(room, 10))
    assert lang.wait(room, 30) is Status.Success, lang.failure_reason(room)
    lang.result(room).release()


def test_a_withdrawn_item_fails_at_once_with_not_published():
    cfg = make_config("shm")
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as lang:
        _connected(enc, lang)
        enc.send_tensors(5, *ROOM_DATA.sample(5, 300))
        assert enc.withdraw(5)
        lang.request(5)
        # answered now (before: WaitingForInput until request_timeout, 30 s here)
        assert lang.wait(5, 2.0) is Status.Failed
        assert lang.failure_code(5) is FailCode.NOT_PUBLISHED
        assert "not published" in lang.failure_reason(5)
        with pytest.raises(NotPublished) as e:
            lang.result(5)
        assert e.value.code is FailCode.NOT_PUBLISHED and e.value.room == 5
        assert enc.stats["not_published"] == 1
        assert lang.allocator.free_blocks == lang.layout.num_blocks
        # recv() raises it too
        with pytest.raises(NotPublished):
            lang.recv(5, timeout=2.0)
        # registered again: served as usual
        enc.send_tensors(5, *ROOM_DATA.sample(5, 300))
        lang.request(5)
        assert lang.wait(5, 10) is Status.Success, lang.failure_reason(5)
        assert ROOM_DATA.verify(5, lang.result(5))
        # withdrawn again, then announced (expect): a request that comes before the
        # registration waits for it, as for a room never let go of
        enc.send_tensors(6, *ROOM_DATA.sample(6, 30))
        assert enc.withdraw(6)
        enc.expect(6)
        lang.request(6)
        assert wait_until(lambda: 6 in enc._rooms, 5) and lang.poll(6) is Status.WaitingForInput
        assert lang.failure_code(6) is FailCode.NONE
        enc.send_tensors(6, *ROOM_DATA.sample(6, 30))
        assert lang.wait(6, 10) is Status.Success, lang.failure_reason(6)
        assert ROOM_DATA.verify(6, lang.result(6))


def test_an_expired_item_fails_at_once_with_not_published():
    cfg = make_config("shm")
    with EncoderEndpoint(cfg.replace(request_timeout=0.5)) as enc, LanguageEndpoint(cfg) as lang:
        _connected(enc, lang)
        enc.send_tensors("late", *ROOM_DATA.sample("late", 50))
        assert enc.wait("late", 10) is Status.Failed              # nobody asked within request_timeout
        lang.request("late")
        assert lang.wait("late", 2.0) is Status.Failed
        assert lang.failure_code("late") is FailCode.NOT_PUBLISHED
        with pytest.raises(NotPublished):
            lang.result("late")


def test_a_room_served_to_another_tp_group_or_all_its_ranks_is_room_busy():
    cfg = make_config("shm")
    a_cfg, b_cfg = cfg.replace(extra={"tp_group": "engine-A"}), cfg.replace(extra={"tp_group": "engine-B"})
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(a_cfg) as a, LanguageEndpoint(a_cfg) as a2, \
            LanguageEndpoint(b_cfg) as b:
        for lang in (a, a2, b):
            _connected(enc, lang, room=id(lang) % 100_000 + 1_000_000)
        a.request(9)
        assert wait_until(lambda: 9 in enc._rooms and len(enc._rooms[9].ranks) == 1)
        # another engine instance's rank: the room belongs to engine-A
        b.request(9)
        assert b.wait(9, 2.0) is Status.Failed and b.failure_code(9) is FailCode.TP_GROUP
        with pytest.raises(RoomBusy) as e:
            b.result(9)
        assert e.value.code is FailCode.TP_GROUP
        # a second rank of engine-A where one is required: the room has its ranks
        a2.request(9)
        assert a2.wait(9, 2.0) is Status.Failed and a2.failure_code(9) is FailCode.BUSY
        with pytest.raises(RoomBusy) as e:
            a2.result(9)
        assert e.value.code is FailCode.BUSY
        # the room itself goes on
        enc.send_tensors(9, *ROOM_DATA.sample(9, 700))
        assert a.wait(9, 10) is Status.Success, a.failure_reason(9)
        assert ROOM_DATA.verify(9, a.result(9))
