"""The encoder side's room state machine on its own: no endpoint, no pool, no threads.

The tests play the endpoint (they carry out the actions the machine returns:
a Write ends whenever a rule says so, landed, failed or skipped) and the
language ranks (they send INIT / RESUME / ABORT and read the STATUS the
machine posts), so writes end while rooms fail, time out, are aborted and
their peers are lost.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from embresume import protocol as P
from embresume.blocks import BlockLayout
from embresume.errors import FailCode, InvalidArgument
from embresume.metrics import EndpointStats
try:
    from prometheus_client import CollectorRegistry
except ImportError:              # without the metrics extra the machines count all the same
    def CollectorRegistry():     # noqa: N802
        return None
from embresume.rooms import encoder as RE
from embresume.rooms import PhaseError
from embresume.rooms.encoder import (TRANSITIONS, Done, EncoderRooms, Phase, Rank, Reject, Send, SendAfterWrite,
                                     Session, Write)
from embresume.status import Status

from conftest import check_phase_changes, record_phase_changes, state_machine_tests

BS, HIDDEN, NB = 4, 8, 8
DTYPE = torch.bfloat16
TIMEOUT = 10.0


class Src:
    """What the machine reads of a registered embedding."""

    def __init__(self, total_tokens: int, hidden: int = HIDDEN, dtype=DTYPE):
        self.total_tokens, self.hidden, self.dtype, self.mrope_delta = total_tokens, hidden, dtype, 0


def session(sid: str, group: str = "g", num_blocks: int = NB, tp_rank: int = 0) -> Session:
    return Session(sid, group, BlockLayout(num_blocks, BS, HIDDEN, DTYPE, 16), None, tp_rank)


def init(s: Session, room, blocks, nonce=1, required=1, allocated=None) -> P.Init:
    blocks = tuple(blocks)
    return P.Init(room, "lang", 0, s.id, blocks, required, len(blocks) * BS if allocated is None else allocated,
                  nonce)


def resume(s: Session, room, blocks, sent, nonce=1, required=1) -> P.Resume:
    blocks = tuple(blocks)
    return P.Resume(room, "lang", 0, s.id, blocks, required, len(blocks) * BS, sent, nonce)


class Harness:
    """The endpoint's side: runs the machine's actions, records what they did,
    and checks what must hold of every action (rules 3 and 7)."""

    def __init__(self, request_timeout: float = TIMEOUT):
        self._stats = EndpointStats("encoder", CollectorRegistry())
        self.m = EncoderRooms(stats=self._stats, request_timeout=request_timeout)
        self.writes: list[Write] = []            # started, not yet reported
        self.msgs: dict = {}                     # session -> [StatusMsg] it was sent (Send, SendAfterWrite, Reject)
        self.rejects: list[Reject] = []
        self.done: list = []                     # rooms ended (Done)
        self.landed: dict = {}                   # Rank -> tokens written into its blocks
        self.wrote: dict = {}                    # Rank -> chunks started
        self.chunks = 0                          # writes that landed in a live room
        self.total: dict = {}                    # Rank -> total tokens of the source written to it
        self.phase_changes = record_phase_changes(self.m)   # (rank, old, new), as the machine made them

    @property
    def stats(self) -> EndpointStats:
        """The endpoint's counters, with the machine's tally recorded into them (as the endpoint does after each event)."""
        self.m.stats.record()
        return self._stats

    def check_phases(self) -> None:
        """Every phase change the machine made is in its table, and every live
        rank's phase agrees with what the harness sees of it."""
        check_phase_changes(self.phase_changes, Phase, TRANSITIONS)
        out = {id(w.rank) for w in self.writes}
        for r in self.m.rooms.values():
            for k in r.ranks.values():
                assert isinstance(k.phase, Phase) and k.phase in TRANSITIONS, k.phase
                assert k.phase is not Phase.FAILED, k        # a live room's ranks are not told Failed
                assert (id(k) in out) == (k.phase in (Phase.WRITING, Phase.UNSAFE)), k
        for w in self.writes:
            assert w.rank.phase in (Phase.WRITING, Phase.UNSAFE), w.rank

    def run(self, actions: list) -> list:
        for a in actions:
            if isinstance(a, Write):
                k = a.rank
                assert k.in_flight and not any(w.rank is k for w in self.writes)
                assert a.first == (self.wrote.get(k, 0) == 0)                          # rule 3
                assert a.seq == k.chunks + 1 and a.ended is a.room.ended and not a.ended.set
                assert set(a.plan.dst_blocks) <= set(k.dst_blocks)
                self.wrote[k] = self.wrote.get(k, 0) + 1
                self.total[k] = a.source.total_tokens
                self.writes.append(a)
            elif type(a) is SendAfterWrite:     # the writing thread, once the lock is released
                self._deliver(a.session, a.msg)
            elif type(a) is Send:               # at once, under the lock
                self._deliver(a.session, a.msg)
            elif isinstance(a, Reject):
                self.rejects.append(a)
                if a.msg is not None:
                    self._deliver(a.session, a.msg)
            elif isinstance(a, Done):
                assert a.room.tracker.status.terminal and self.m.rooms.get(a.room.room) is not a.room
                assert a.room.ended.set         # what its writers read outside the lock says so
                if a.room.tracker.status is Status.Success:
                    # every rank got every token (a full copy each)
                    sent = {k.sent_tokens for k in a.room.ranks.values()}
                    assert len(a.room.ranks) == a.room.required and len(sent) == 1
                    assert all(k.done and self.landed.get(k) == k.sent_tokens == self.total[k]
                               for k in a.room.ranks.values())
                assert a.room not in self.done
                self.done.append(a.room)
            else:
                raise AssertionError(f"unknown action {a!r}")
        return actions

    def _deliver(self, s: Session, msg: P.StatusMsg) -> None:
        if msg.status is Status.Failed:
            # rule 7: never while a write into that rank's blocks is out, the
            # confirmation of an ABORT included (it would let the rank free
            # blocks that a late write still lands in)
            assert not any(w.rank.session is s and w.room.room == msg.room for w in self.writes), msg
        self.msgs.setdefault(s, []).append(msg)

    def take(self, s: Session) -> list:
        out, self.msgs[s] = self.msgs.get(s, []), []
        return out

    def complete(self, w: Write, how: str = "written", now: float = 0.0) -> list:
        self.writes.remove(w)
        assert w.ended.set == w.room.tracker.status.terminal     # the writer's view agrees with the machine
        if how == "written":
            if not w.room.tracker.status.terminal:
                self.landed[w.rank] = self.landed.get(w.rank, 0) + w.plan.tokens
                self.chunks += 1
            acts = self.run(self.m.written(w.room, w.rank, w.plan, now))
        elif how == "failed":
            acts = self.run(self.m.write_failed(w.room, w.rank, "test: write failed"))
        else:
            acts = self.run(self.m.write_skipped(w.room, w.rank))
        return acts

    def finish_writes(self, now: float = 0.0) -> None:
        while self.writes:
            self.complete(self.writes[0], now=now)


def _only(msgs, status=None):
    assert len(msgs) == 1, msgs
    if status is not None:
        assert msgs[0].status is status, msgs[0]
    return msgs[0]


# ---------------------------------------------------------------- unit tests
def test_init_then_send_one_chunk_success():
    h = Harness()
    s = session("s")
    assert h.run(h.m.init(s, init(s, 1, range(4)), 0.0)) == []           # no source yet
    assert s.live_rooms == 1 and s.live_blocks == 4
    (w,) = h.run(h.m.register(1, Src(10), 0.0))
    assert w.first and w.plan.tokens == 10 and not w.plan.partial and w.plan.dst_blocks == (0, 1, 2)
    assert s.live_blocks == 4                                               # answered only after the write
    h.complete(w, now=0.5)
    msg = _only(h.take(s), Status.Success)
    assert (msg.seq, msg.sent_tokens, msg.chunk_tokens, msg.total_tokens) == (1, 10, 10, 10)
    assert h.done and h.done[0].room == 1 and not h.m.rooms
    assert s.live_rooms == 0 and s.live_blocks == 0
    assert h.stats["chunks"] == 1 and h.stats["bytes"] == 10 * HIDDEN * 2 and h.stats["success"] == 1
    assert h.stats["sends"] == 1 and h.stats["requests"] == 1
    assert h.m.status(1) is Status.Success


def test_resume_is_planned_from_what_was_sent():
    h = Harness()
    s = session("s")
    h.run(h.m.register(1, Src(22), 0.0))
    (w,) = h.run(h.m.init(s, init(s, 1, range(2)), 0.0))
    assert w.plan.tokens == 8 and w.plan.partial and w.plan.src_block_start == 0
    h.complete(w)
    msg = _only(h.take(s), Status.Transferring)
    assert msg.sent_tokens == 8 and s.live_blocks == 0
    # a RESUME with the wrong sent_tokens fails the room; the right one continues
    assert h.run(h.m.resume(s, resume(s, 1, (5,), 4), 0.0))[0].msg.status is Status.Failed
    h2 = Harness()
    s2 = session("s2")
    h2.run(h2.m.register(1, Src(22), 0.0))
    h2.complete(h2.run(h2.m.init(s2, init(s2, 1, range(2)), 0.0))[0])
    (w,) = h2.run(h2.m.resume(s2, resume(s2, 1, (5, 6), 8), 0.0))
    assert not w.first and w.plan.src_block_start == 2 and w.plan.tokens == 8 and w.plan.dst_blocks == (5, 6)
    assert h2.run(h2.m.resume(s2, resume(s2, 1, (5, 6), 8), 0.0)) == []    # a duplicate while in flight
    assert h2.stats["duplicates"] == 1
    h2.complete(w)
    (w,) = h2.run(h2.m.resume(s2, resume(s2, 1, range(4), 16), 0.0))
    assert w.plan.tokens == 6 and not w.plan.partial and w.plan.dst_blocks == (0, 1)
    h2.complete(w)
    assert [m.status for m in h2.take(s2)] == [Status.Transferring, Status.Transferring, Status.Success]
    assert h2.done[0].tracker.status is Status.Success and s2.live_rooms == s2.live_blocks == 0


def test_rule4_replayed_init_is_ignored_and_a_new_nonce_is_a_new_use():
    h = Harness()
    s = session("s")
    h.run(h.m.register(1, Src(4), 0.0))
    (w,) = h.run(h.m.init(s, init(s, 1, [0], nonce=7), 0.0))
    assert h.run(h.m.init(s, init(s, 1, [0], nonce=7), 0.0)) == []         # duplicate while live
    assert h.stats["duplicates"] == 1
    h.complete(w)
    _only(h.take(s), Status.Success)
    assert h.run(h.m.init(s, init(s, 1, [0], nonce=7), 0.0)) == []         # replay after the room finished
    assert h.stats["duplicates"] == 2 and not h.m.rooms and s.live_rooms == 0
    # a new nonce: a new use of the key, in either order of request and send
    assert h.run(h.m.init(s, init(s, 1, [1], nonce=8), 0.0)) == []
    assert 1 in h.m.rooms and h.m.status(1) is Status.WaitingForInput
    (w,) = h.run(h.m.register(1, Src(3), 1.0))
    h.complete(w)
    assert _only(h.take(s), Status.Success).total_tokens == 3
    # another session with the same nonce is not a replay
    t = session("t")
    assert h.run(h.m.init(t, init(t, 1, [0], nonce=7), 0.0)) == []
    assert h.m.rooms[1].ranks.keys() == {"t"}


def test_new_nonce_while_receiving_fails_the_room():
    h = Harness()
    s = session("s")
    h.run(h.m.init(s, init(s, 1, [0], nonce=1), 0.0))
    acts = h.run(h.m.init(s, init(s, 1, [1], nonce=2), 0.0))
    assert isinstance(acts[0], Reject) and acts[0].msg is None                # the room fails instead
    assert _only(h.take(s), Status.Failed) and not h.m.rooms and s.live_rooms == s.live_blocks == 0


def test_another_tp_group_is_rejected_to_its_sender_alone():
    h = Harness()
    a0, a1, b = session("a0", "A"), session("a1", "A", tp_rank=1), session("b", "B", tp_rank=1)
    h.run(h.m.init(a0, init(a0, 9, [0, 1], required=2), 0.0))
    for required in (2, 3):
        acts = h.run(h.m.init(b, init(b, 9, [0], nonce=required, required=required), 0.0))
        (rej,) = acts
        assert isinstance(rej, Reject) and "TP group" in rej.reason
        assert _only(h.take(b), Status.Failed).room == 9
    assert h.stats["other_group"] == 2 and h.stats["rejected"] == 2
    assert h.take(a0) == [] and h.m.rooms[9].ranks.keys() == {"a0"} and b.live_rooms == b.live_blocks == 0
    h.run(h.m.init(a1, init(a1, 9, [3], required=2), 0.0))
    ws = h.run(h.m.register(9, Src(5), 0.0))
    assert {w.rank.session for w in ws} == {a0, a1}
    h.finish_writes()
    assert [m.status for m in h.take(a0)] == [Status.Success]
    assert [m.status for m in h.take(a1)] == [Status.Transferring]          # one block: 4 of 5 tokens
    assert h.m.rooms[9].ranks.keys() == {"a0", "a1"}


def test_ranks_that_disagree_on_required_fail_the_room():
    h = Harness()
    a, b = session("a"), session("b")
    h.run(h.m.init(a, init(a, 1, [0], required=2), 0.0))
    h.run(h.m.init(b, init(b, 1, [0], required=3), 0.0))
    _only(h.take(a), Status.Failed)
    _only(h.take(b), Status.Failed)
    assert not h.m.rooms and a.live_rooms == b.live_rooms == 0


def test_more_ranks_than_required_are_rejected():
    h = Harness()
    a, b = session("a"), session("b")
    h.run(h.m.init(a, init(a, 1, [0]), 0.0))
    h.run(h.m.init(b, init(b, 1, [0]), 0.0))
    assert "more than required_dst_info_num" in h.rejects[0].reason
    _only(h.take(b), Status.Failed)
    assert h.take(a) == [] and h.m.rooms[1].ranks.keys() == {"a"}


def test_bad_destination_is_rejected():
    h = Harness()
    s = session("s")
    for bad in (init(s, 1, [NB]), init(s, 1, [0, 1], allocated=BS), init(session("x"), 1, [0])):
        h.run(h.m.init(s, bad, 0.0))
        _only(h.take(s), Status.Failed)
    assert h.stats["rejected"] == 3 and not h.m.rooms and s.live_rooms == 0
    # a RESUME for a room the encoder does not hold
    h.run(h.m.resume(s, resume(s, 5, [0], 4), 0.0))
    assert "does not hold" in _only(h.take(s), Status.Failed).reason


def test_round_starts_when_every_rank_not_done_asked():
    h = Harness()
    a, b = session("a"), session("b", tp_rank=1)
    h.run(h.m.register(1, Src(20), 0.0))
    assert h.run(h.m.init(a, init(a, 1, [0, 1], required=2), 0.0)) == []   # b has not asked yet
    (wb, wa) = sorted(h.run(h.m.init(b, init(b, 1, [0, 1, 2, 3], required=2), 0.0)),
                      key=lambda w: w.rank.session.id != "b")
    assert wa.plan.tokens == 8 and wb.plan.tokens == 16
    h.complete(wa)
    h.complete(wb)
    assert h.run(h.m.resume(a, resume(a, 1, [0, 1], 8), 0.0)) == []       # b has not asked for round 2
    h.run(h.m.resume(b, resume(b, 1, [0, 1], 16), 0.0))                     # now both go
    assert {w.rank.session for w in h.writes} == {a, b}
    h.finish_writes()
    assert _only(h.take(a)[1:], Status.Transferring)
    assert [m.status for m in h.take(b)] == [Status.Transferring, Status.Success]
    # b is done: a's next round no longer waits for it
    (w,) = h.run(h.m.resume(a, resume(a, 1, [0, 1], 16), 0.0))
    h.complete(w)
    _only(h.take(a), Status.Success)
    assert h.done and h.done[0].tracker.status is Status.Success


def test_per_session_bounds_refuse_that_session_only_and_go_back_down(monkeypatch):
    monkeypatch.setattr(RE, "MAX_LIVE_ROOMS_PER_SESSION", 3)
    h = Harness()
    s, other = session("s"), session("o")
    for room in range(3):
        h.run(h.m.init(s, init(s, room, [room]), 0.0))
    assert s.live_rooms == 3 and s.live_blocks == 3
    h.run(h.m.init(s, init(s, 3, [3]), 0.0))                          # past the room bound
    assert "bounds" in _only(h.take(s), Status.Failed).reason
    h.run(h.m.init(other, init(other, 3, [3]), 0.0))                  # another session is served
    assert h.take(other) == [] and other.live_rooms == 1
    h.run(h.m.init(other, init(other, 20, range(8)), 0.0))            # past the block bound (1 + 8 > 8)
    assert "bounds" in _only(h.take(other), Status.Failed).reason
    assert h.stats["refused_bound"] == 2 and h.take(s) == [] and other.live_rooms == 1 and other.live_blocks == 1
    # a session may ask for its whole pool once its other blocks are answered
    h.run(h.m.register(0, Src(2), 0.0))
    h.finish_writes()
    _only(h.take(s), Status.Success)
    assert s.live_rooms == 2 and s.live_blocks == 2
    h.run(h.m.init(s, init(s, 11, range(2, 8)), 0.0))                 # 2 + 6 blocks = the pool
    assert h.take(s) == [] and s.live_rooms == 3 and s.live_blocks == 8
    h.run(h.m.init(s, init(s, 12, [0]), 0.0))
    _only(h.take(s), Status.Failed)
    assert h.stats["refused_bound"] == 3
    h.run(h.m.tick(100.0))                                            # everything times out
    assert not h.m.rooms and s.live_rooms == s.live_blocks == 0 and other.live_rooms == other.live_blocks == 0


def test_abort_confirms_and_an_in_flight_write_defers_the_failed():
    h = Harness()
    s = session("s")
    h.run(h.m.abort(s, P.Abort(4, "nothing here")))
    assert _only(h.take(s), Status.Failed).flags == P.FLAG_ABORT_ACK
    h.run(h.m.register(1, Src(4), 0.0))
    (w,) = h.run(h.m.init(s, init(s, 1, [0]), 0.0))
    assert [type(a) for a in h.run(h.m.abort(s, P.Abort(1, "bye")))] == [Done]
    assert h.take(s) == [] and not h.m.rooms                        # deferred: the write is out
    assert s.live_rooms == 0 and s.live_blocks == 1                  # its blocks are not answered yet
    h.complete(w)                                                    # lands after the abort: Failed, not Success
    msg = _only(h.take(s), Status.Failed)
    assert msg.flags == P.FLAG_ABORT_ACK and s.live_blocks == 0
    assert h.stats["failed"] == 1 and h.stats["success"] == 0


def test_an_abort_after_the_room_ended_waits_for_the_write_still_out():
    """The room fails (here: another rank aborts) while a write into rank s's
    blocks is out; s, not told yet, aborts too.  Its acknowledgement is the
    Failed sent when the write is over, never an immediate confirmation that
    would let s free blocks the write still lands in."""
    h = Harness()
    s, t = session("s"), session("t", tp_rank=1)
    h.run(h.m.register(1, Src(4), 0.0))
    h.run(h.m.init(s, init(s, 1, [0], required=2), 0.0))
    writes = h.run(h.m.init(t, init(t, 1, [0], required=2), 0.0))
    assert {w.rank.session.id for w in writes} == {"s", "t"}
    w_s = next(w for w in writes if w.rank.session is s)
    w_t = next(w for w in writes if w.rank.session is t)
    h.complete(w_t)
    h.take(t)
    h.run(h.m.abort(t, P.Abort(1, "t gives up")))        # the room ends; s's write is still out
    assert not h.m.rooms and ("s", 1) in h.m.orphans
    h.run(h.m.abort(s, P.Abort(1, "s gives up too")))
    assert h.take(s) == []                                # no confirmation ahead of the write
    h.complete(w_s)
    msg = _only(h.take(s), Status.Failed)
    assert msg.flags & P.FLAG_ABORT_ACK and not h.m.orphans and s.live_blocks == 0


def test_failed_write_marks_blocks_unsafe_and_tells_the_other_ranks():
    h = Harness()
    a, b = session("a"), session("b", tp_rank=1)
    h.run(h.m.init(a, init(a, 1, [0], required=2), 0.0))
    h.run(h.m.init(b, init(b, 1, [0], required=2), 0.0))
    wa, wb = sorted(h.run(h.m.register(1, Src(4), 0.0)), key=lambda w: w.rank.session.id)
    h.complete(wa, "failed")
    msg = _only(h.take(a), Status.Failed)
    assert msg.flags & P.FLAG_BLOCKS_UNSAFE and "write failed" in msg.reason
    assert h.take(b) == []                                           # b's write is still out
    h.complete(wb, "skipped")
    assert not _only(h.take(b), Status.Failed).flags & P.FLAG_BLOCKS_UNSAFE
    assert a.live_blocks == b.live_blocks == 0 and h.stats["failed"] == 1


def test_peer_lost_fails_its_rooms_and_tells_only_the_live_ranks():
    h = Harness()
    a, b = session("a"), session("b", tp_rank=3)
    h.run(h.m.init(a, init(a, 1, [0], required=2), 0.0))
    h.run(h.m.init(b, init(b, 1, [0], required=2), 0.0))
    h.run(h.m.init(a, init(a, 2, [1]), 0.0))
    h.run(h.m.peer_lost(b, "gone"))
    assert "language rank 3 lost: gone" in _only(h.take(a), Status.Failed).reason
    assert h.take(b) == [] and list(h.m.rooms) == [2] and b.live_rooms == b.live_blocks == 0
    assert h.run(h.m.peer_lost(b, "again")) == []


def test_withdraw_and_register_twice():
    h = Harness()
    s = session("s")
    h.run(h.m.register(1, Src(4), 0.0))
    with pytest.raises(InvalidArgument):
        h.m.register(1, Src(4), 0.0)
    assert h.run(h.m.withdraw(1))[0].room.room == 1 and h.m.status(1) is Status.Failed
    assert h.m.withdraw(1) is None and h.stats["failed"] == 0
    h.run(h.m.register(1, Src(4), 0.0))
    h.run(h.m.init(s, init(s, 1, [0]), 0.0))
    assert h.m.withdraw(1) is None                                  # asked for: runs to its end


def test_timeouts_and_close_leave_nothing():
    h = Harness()
    s = session("s")
    h.run(h.m.register(1, Src(40), 0.0))
    (w,) = h.run(h.m.init(s, init(s, 1, [0]), 0.0))
    h.run(h.m.register(2, Src(4), 0.0))
    h.run(h.m.tick(5.0))
    assert set(h.m.rooms) == {1, 2}
    h.complete(w, now=6.0)                                           # a chunk extends the deadline
    h.run(h.m.tick(12.0))
    assert set(h.m.rooms) == {1} and h.m.status(2) is Status.Failed
    h.run(h.m.close())
    assert not h.m.rooms and s.live_rooms == s.live_blocks == 0
    assert [m.status for m in h.take(s)] == [Status.Transferring, Status.Failed]
    assert h.stats["failed"] == 2


def test_an_embedding_nobody_asked_for_expires_a_room_asked_for_times_out():
    """Past request_timeout, a registered embedding no rank asked for ends with cause
    "expired" (the shell logs it at DEBUG: nobody failed), a room a rank asked for with
    "timeout" (a WARNING); both are TIMEOUT on the wire and free what they held."""
    h = Harness()
    s = session("s")
    h.run(h.m.register(1, Src(4), 0.0))                              # never asked for
    h.run(h.m.register(2, Src(40), 0.0))
    h.run(h.m.init(s, init(s, 2, [0]), 0.0))                          # asked for, never resumed
    h.run(h.m.tick(100.0))
    done = {r.room: r for r in h.done}
    assert set(done) == {1, 2} and not h.m.rooms
    assert (done[1].cause, done[2].cause) == ("expired", "timeout")
    assert done[1].code is done[2].code is FailCode.TIMEOUT


def test_layout_mismatch_fails_the_room():
    h = Harness()
    s = session("s")
    h.run(h.m.init(s, init(s, 1, [0]), 0.0))
    h.run(h.m.register(1, Src(4, hidden=HIDDEN * 2), 0.0))
    assert "rank pool is" in _only(h.take(s), Status.Failed).reason


# ---------------------------------------------------------------- stateful
ROOMS = 3


class MachineRooms(RuleBasedStateMachine):
    """Random interleavings of send / withdraw, INIT / RESUME / ABORT from
    three sessions (two of one TP group, one of another), replays, writes
    that land, fail or are skipped at any time, lost peers (and their
    reconnection), ticks past the timeout.  After every step each session's
    live counts agree with the machine's rooms, no Success went out before
    all the rank's tokens were written, no Failed while a write into its
    blocks was out; at the end nothing is left."""

    def __init__(self):
        super().__init__()
        self.h = Harness()
        self.now = 0.0
        self.sessions = [session("s0", "A", tp_rank=0), session("s1", "A", tp_rank=1),
                         session("s2", "B", tp_rank=0)]
        self.all_sessions = list(self.sessions)
        self.nonce = 0
        #: (session, room) -> [nonce, last status seen, resumed, rank] of a request not yet answered
        self.asked: dict = {}
        self.accepted: dict = {}        # (session, room) -> the last INIT that became a rank
        self.withdrawn = 0

    def _run(self, acts):
        self.h.run(acts)
        self._read()

    def _rank(self, s, room, nonce):
        """The rank ``s``'s INIT ``nonce`` of ``room`` became, in the live room or one that just ended."""
        for r in [self.h.m.rooms.get(room)] + self.h.done[-2:]:
            k = r.ranks.get(s.id) if r is not None and r.room == room else None
            if k is not None and k.session is s and k.nonce == nonce:
                return k
        return None

    def _read(self):
        for s in self.all_sessions:
            for msg in self.h.take(s):
                key = (s, msg.room)
                a = self.asked.get(key)
                if msg.status is Status.Success:
                    assert a is not None, msg
                    k = a[3]
                    # no Success before all the tokens of that rank were written
                    assert k is not None and self.h.landed.get(k, 0) == msg.total_tokens == msg.sent_tokens
                    assert msg.seq == self.h.wrote[k]
                elif msg.status is Status.Transferring:
                    assert a is not None and a[3] is not None, msg
                    assert self.h.landed.get(a[3], 0) == msg.sent_tokens < msg.total_tokens
                    a[1], a[2] = Status.Transferring, False
                    continue
                if msg.status.terminal:
                    self.asked.pop(key, None)

    # -- the application
    @rule(room=st.integers(0, ROOMS - 1), tokens=st.integers(1, 6 * BS), wide=st.integers(0, 9))
    def send(self, room, tokens, wide):
        r = self.h.m.rooms.get(room)
        src = Src(tokens, hidden=HIDDEN * 2 if wide == 0 else HIDDEN)
        if r is not None and r.source is not None:
            with pytest.raises(InvalidArgument):
                self.h.m.register(room, src, self.now)
            return
        self._run(self.h.m.register(room, src, self.now))

    @rule(room=st.integers(0, ROOMS - 1), often=st.integers(0, 2))
    def withdraw(self, room, often):
        if often:
            return
        r = self.h.m.rooms.get(room)
        refused = r is None or r.source is None or bool(r.ranks)
        acts = self.h.m.withdraw(room)
        if refused:
            assert acts is None
        else:
            self.withdrawn += 1
            self._run(acts)

    # -- the ranks
    @rule(i=st.integers(0, 2), room=st.integers(0, ROOMS - 1), first=st.integers(0, NB - 1),
          n=st.integers(1, 4), required=st.sampled_from([1, 1, 1, 2, 2, 3]), agree=st.integers(0, 9),
          bad=st.integers(0, 9))
    def init(self, i, room, first, n, required, agree, bad):
        s = self.sessions[i]
        if (s, room) in self.asked:
            return                                  # an honest rank asks again only once answered
        live = self.h.m.rooms.get(room)
        if live is not None and live.required and agree:
            required = live.required                # mostly, the ranks of a room agree
        self.nonce += 1
        blocks = [(first + j) % NB for j in range(n)]
        if bad == 0:
            blocks[-1] = NB                         # out of range
        msg = init(s, room, blocks, self.nonce, required, n * BS - (1 if bad == 1 else 0))
        rej = self.h.stats["rejected"]
        dup = self.h.stats["duplicates"]
        self.asked[(s, room)] = [self.nonce, None, False, None]
        self.h.run(self.h.m.init(s, msg, self.now))
        k = self._rank(s, room, self.nonce)
        if k is not None:                           # a rank now (its room may have failed at once)
            self.asked[(s, room)][3] = k
            self.accepted[(s, room)] = msg
            assert self.h.stats["rejected"] == rej
        else:
            assert self.h.stats["rejected"] == rej + 1 and self.h.stats["duplicates"] == dup
        if bad <= 1:
            assert k is None
        self._read()

    @rule(room=st.integers(0, ROOMS - 1), tokens=st.integers(1, 6 * BS), two=st.booleans(),
          n=st.integers(1, 4), first=st.integers(0, NB - 1))
    def request(self, room, tokens, two, n, first):
        """The usual case: the embedding and the INITs of one TP group's ranks."""
        if room in self.h.m.rooms:
            return
        self._run(self.h.m.register(room, Src(tokens), self.now))
        for i in range(1 + two):
            self.init(i, room, (first + 3 * i) % NB, n, 1 + two, 1, 9)

    @rule(i=st.integers(0, 2), room=st.integers(0, ROOMS - 1))
    def replay(self, i, room):
        s = self.sessions[i]
        msg = self.accepted.get((s, room))
        r = self.h.m.rooms.get(room)
        if msg is None or (r is not None and (s.id not in r.ranks or r.ranks[s.id].nonce != msg.nonce)):
            return
        dup = self.h.stats["duplicates"]
        assert self.h.m.init(s, msg, self.now) == []                        # rule 4
        assert self.h.stats["duplicates"] == dup + 1

    @rule(data=st.data(), honest=st.integers(0, 9))
    def resume(self, data, honest):
        ready = [(key, a) for key, a in self.asked.items() if a[1] is Status.Transferring and not a[2]]
        if not ready:
            return
        (s, room), a = ready[data.draw(st.integers(0, len(ready) - 1))]
        first, n = data.draw(st.integers(0, NB - 1)), data.draw(st.integers(1, 4))
        k = a[3]
        sent = self.h.landed.get(k, 0) + (BS if honest == 0 else 0)
        a[2] = True
        self._run(self.h.m.resume(s, resume(s, room, [(first + j) % NB for j in range(n)], sent, a[0],
                                            self.h.m.rooms[room].required if room in self.h.m.rooms else 1),
                                  self.now))

    @rule(i=st.integers(0, 2), room=st.integers(0, ROOMS - 1), often=st.integers(0, 2))
    def abort(self, i, room, often):
        if often:
            return
        s = self.sessions[i]
        self.asked.setdefault((s, room), [0, None, True, None])   # answered by its Failed (the ack)
        self._run(self.h.m.abort(s, P.Abort(room, "test")))

    # -- the endpoint
    @rule(data=st.data(), how=st.sampled_from(["written", "written", "written", "failed", "skipped"]))
    def write_ends(self, data, how):
        if not self.h.writes:
            return
        w = self.h.writes[data.draw(st.integers(0, len(self.h.writes) - 1))]
        if how == "skipped" and not w.room.tracker.status.terminal:
            how = "written"                         # the endpoint skips only writes of ended rooms
        self.h.complete(w, how, self.now)
        self._read()

    @rule()
    def progress(self):
        """Every write out lands, every rank that got Transferring resumes honestly."""
        self.h.finish_writes(self.now)
        self._read()
        for (s, room), a in list(self.asked.items()):
            if a[1] is Status.Transferring and not a[2] and room in self.h.m.rooms:
                a[2] = True
                dup = self.h.stats["duplicates"]
                self._run(self.h.m.resume(s, resume(s, room, range(4), self.h.landed.get(a[3], 0), a[0],
                                                    self.h.m.rooms[room].required), self.now))
                assert self.h.stats["duplicates"] == dup        # the rank was waiting for its next chunk

    @rule(i=st.integers(0, 2), often=st.integers(0, 5))
    def peer_lost(self, i, often):
        if often:
            return
        s = self.sessions[i]
        self._run(self.h.m.peer_lost(s, "test"))
        for key in [key for key in self.asked if key[0] is s]:
            del self.asked[key]
        # it reconnects: the same session id, a new connection
        self.sessions[i] = session(s.id, s.group, tp_rank=s.tp_rank)
        self.all_sessions.append(self.sessions[i])

    @rule(dt=st.sampled_from([0.5, 1.0, 2.0, 3.0, 0.5, 1.0, 2.0, TIMEOUT + 1]))
    def tick(self, dt):
        self.now += dt
        self._run(self.h.m.tick(self.now))

    # -- invariants
    def _ranks_of(self, s):
        """Ranks of ``s`` that may count against it: in a live room, or with a write out."""
        ranks = {k for r in self.h.m.rooms.values() for k in r.ranks.values() if k.session is s}
        return ranks | {w.rank for w in self.h.writes if w.rank.session is s}

    @invariant()
    def live_counts_agree_with_the_rooms(self):
        m = self.h.m
        for s in self.all_sessions:
            live = [r for r in m.rooms.values() if s.id in r.ranks and r.ranks[s.id].session is s]
            assert s.live_rooms == len(live), (s, s.live_rooms, len(live))
            assert s.live_blocks == sum(k.counted for k in self._ranks_of(s)), s
        out = {w.rank for w in self.h.writes}
        for k in out:                               # blocks being written are not answered yet
            assert k.counted == len(k.dst_blocks) and k.session.live_blocks >= k.counted
        for r in m.rooms.values():
            assert not r.tracker.status.terminal
            assert len({k.session.group for k in r.ranks.values()}) <= 1      # one TP group per room
            for k in r.ranks.values():
                assert k.counted in (0, len(k.dst_blocks))
                assert bool(k.counted) == (k.pending or k.in_flight), k
                assert k.in_flight == (k in out)
                assert not (k.done and (k.pending or k.in_flight))

    @invariant()
    def every_phase_change_is_in_the_table(self):
        self.h.check_phases()

    @invariant()
    def every_ended_room_is_counted_once(self):
        s = self.h.stats
        assert len(self.h.done) == s["success"] + s["failed"] + self.withdrawn
        assert s["chunks"] == self.h.chunks
        assert all(r.room not in self.h.m.rooms or self.h.m.rooms[r.room] is not r for r in self.h.done)

    def teardown(self):
        m, h = self.h.m, self.h
        if self.nonce % 2:
            self._run(m.close())                    # close with writes still out
            assert not m.rooms
        h.finish_writes(self.now)
        self._read()
        self._run(m.tick(self.now + 2 * TIMEOUT))   # everything left times out
        assert not m.rooms and not h.writes
        assert m.close() == [] and m.tick(self.now + 10 * TIMEOUT) == []
        for s in self.all_sessions:
            assert s.live_rooms == 0 and s.live_blocks == 0, s
        # every request of a live session got its final answer
        assert not [key for key in self.asked if key[0].alive], self.asked
        self.live_counts_agree_with_the_rooms()
        self.every_ended_room_is_counted_once()
        self.h.check_phases()


(TestMachineRooms,) = state_machine_tests(MachineRooms, examples=100, steps=40)


def test_the_phase_table_is_closed_and_an_illegal_change_raises():
    """Every phase has a row, every target is a phase, FAILED leads nowhere; a
    change the table lacks raises PhaseError and changes nothing."""
    assert set(TRANSITIONS) == set(Phase)
    assert all(set(row) <= set(Phase) for row in TRANSITIONS.values())
    assert TRANSITIONS[Phase.FAILED] == {}
    h = Harness()
    s = session("s0")
    h.run(h.m.register(1, Src(3 * BS), 0.0))
    h.run(h.m.init(s, init(s, 1, range(2)), 0.0))
    (w,) = h.writes
    k = w.rank
    assert k.phase is Phase.WRITING and k.in_flight and not k.pending
    for bad in (Phase.ASKED, Phase.WRITING):
        with pytest.raises(PhaseError, match=f"WRITING -> {bad.name}"):
            EncoderRooms._set_phase(k, bad)
        assert k.phase is Phase.WRITING
    h.complete(w)
    assert k.phase is Phase.SENT
    with pytest.raises(PhaseError):
        EncoderRooms._set_phase(k, Phase.DONE)         # no chunk is out: it cannot be done
    lone = Rank(s, 1, (0,), BS)
    assert lone.phase is Phase.ASKED
    with pytest.raises(PhaseError):
        EncoderRooms._set_phase(lone, Phase.SENT)
    h.check_phases()


def test_handle_takes_the_events_and_the_methods_are_its_wrappers():
    """One entry: an event dataclass in, the actions out; the per-event methods
    give the same answers; an object that is no event raises TypeError."""
    a, b = Harness(), Harness()
    sa, sb = session("s0"), session("s0")
    acts_a = a.run(a.m.handle(RE.Register(1, Src(3 * BS), 0.0)))
    acts_b = b.run(b.m.register(1, Src(3 * BS), 0.0))
    assert acts_a == acts_b == []
    acts_a = a.run(a.m.handle(RE.InitReceived(sa, init(sa, 1, range(2)), 0.0)))
    acts_b = b.run(b.m.init(sb, init(sb, 1, range(2)), 0.0))
    assert [type(x) for x in acts_a] == [type(x) for x in acts_b] == [Write]
    acts_a = a.complete(a.writes[0])
    acts_b = b.complete(b.writes[0])
    assert [type(x) for x in acts_a] == [type(x) for x in acts_b] == [SendAfterWrite]
    assert acts_a[0].msg == acts_b[0].msg and acts_a[0].msg.status is Status.Transferring
    with pytest.raises(TypeError, match="not an event"):
        a.m.handle(P.Heartbeat(1, 0))
