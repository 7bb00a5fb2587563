"""The language side's room state machine on its own: no endpoint, no pool, no threads.

The tests play the endpoint (they carry out the actions the machine returns)
and the encoders (they answer its INITs and RESUMEs with the planner's
chunks).  Unlike the endpoint-driven test in test_fuzz.py, a copy here ends
whenever a rule says so, so aborts, timeouts and link loss also land while a
copy is running.
"""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from embresume import protocol as P
from embresume.errors import FailCode, InvalidArgument, TransferFailed
from embresume.metrics import EndpointStats
try:
    from prometheus_client import CollectorRegistry
except ImportError:              # without the metrics extra the machines count all the same
    def CollectorRegistry():     # noqa: N802
        return None
from embresume.planner import plan_chunk
from embresume.rooms import PhaseError
from embresume.rooms import language as RL
from embresume.rooms.language import (TRANSITIONS, Complete, Connect, Copy, Discard, LanguageRooms, Notify, Phase, Req,
                                      Send, TearDown, ZeroCopy)
from embresume.status import Status

from conftest import check_phase_changes, record_phase_changes, state_machine_tests

BS = 128


class Harness:
    """The endpoint's side of the machine: runs its actions, records what they did."""

    def __init__(self, num_blocks=8, **kw):
        self.aux: dict[int, int] = {}           # block -> total tokens written into its aux
        self._stats = EndpointStats("language", CollectorRegistry())
        opts = dict(default_allocate_tokens=256, request_timeout=10.0, quarantine_timeout=4.0)
        opts.update(kw)
        self.m = LanguageRooms(num_blocks=num_blocks, block_size=BS, row_bytes=8, stats=self._stats, **opts)
        self.sent: dict[str, list] = {}          # address -> messages that went out
        self.down: set = set()                   # addresses whose sends fail
        self.copies: list[Copy] = []
        self.leases: dict[int, int] = {}         # nonce -> lease id of its zero-copy result
        self.completed: set = set()              # nonces made results by Complete / ZeroCopy
        self.notified: list = []
        self.teardowns: list = []
        self.connects: list = []
        self.phase_changes = record_phase_changes(self.m)   # (request, old, new), as the machine made them

    def check_phases(self) -> None:
        """Every phase change the machine made is in its table, and every
        request's phase agrees with what the harness sees of it."""
        check_phase_changes(self.phase_changes, Phase, TRANSITIONS)
        copying = {id(c.req) for c in self.copies}
        for req in self.m.reqs.values():
            assert isinstance(req.phase, Phase) and req.phase in TRANSITIONS, req.phase
            assert (req.phase in (Phase.SUCCEEDED, Phase.FAILED, Phase.FAILED_COPYING)) == \
                req.tracker.status.terminal, (req.phase, req.tracker.status)
            assert (req.phase is Phase.SUCCEEDED) == (req.tracker.status is Status.Success)
            assert (id(req) in copying) == (req.phase in (Phase.COPYING, Phase.FAILED_COPYING)), req.phase
            if req.phase in (Phase.BOOTSTRAPPING, Phase.WAITING_BLOCKS):
                assert not req.blocks
            if req.phase is Phase.WAITING_BLOCKS:
                assert req.room in self.m._waiting
            if req.phase is Phase.ASKED:
                assert req.blocks

    @property
    def stats(self) -> EndpointStats:
        """The endpoint's counters, with the machine's tally recorded into them (as the endpoint does after each event)."""
        self.m.stats.record()
        return self._stats

    def read_aux(self, address: str, msg):
        """What the endpoint does before a STATUS or PROGRESS: read the aux the machine names, hand it in as data."""
        block = self.m.aux_block(address, msg)
        return None if block is None else (self.aux.get(block, 0), ("aux", block))

    def status(self, address: str, msg: P.StatusMsg, now: float) -> list:
        return self.m.handle(RL.StatusReceived(address, msg, now, self.read_aux(address, msg)))

    def progress(self, address: str, msg: P.Progress) -> list:
        return self.m.handle(RL.ProgressReceived(address, msg, self.read_aux(address, msg)))

    def run(self, actions: list) -> None:
        i = 0
        while i < len(actions):
            a = actions[i]
            i += 1
            if isinstance(a, Send):
                if a.address in self.down:
                    actions.extend(self.m.send_failed(a.address, a.msg, "test: link refuses"))
                else:
                    self.sent.setdefault(a.address, []).append(a.msg)
            elif isinstance(a, Copy):
                self.copies.append(a)
            elif isinstance(a, ZeroCopy):
                assert a.req.sent_tokens == a.tokens == a.req.total_tokens
                self.leases[a.req.nonce] = a.lease
                self.completed.add(a.req.nonce)
            elif isinstance(a, Complete):
                self.completed.add(a.req.nonce)
            elif isinstance(a, Notify):
                assert a.req.tracker.status.terminal
                self.notified.append(a.req)
            elif isinstance(a, TearDown):
                self.teardowns.append(a.address)
                actions.extend(self.m.link_lost(a.address, a.reason))
            elif isinstance(a, Connect):
                self.connects.append(a.address)
            elif isinstance(a, Discard):
                pass
            else:
                raise AssertionError(f"unknown action {a!r}")

    def take(self, address: str) -> list:
        out, self.sent[address] = self.sent.get(address, []), []
        return out


def _chunk(h: Harness, address: str, msg, total: int, seq: int, now: float = 0.0):
    """The encoder writes the chunk ``msg`` (INIT or RESUME) asks for and reports it."""
    sent = msg.sent_tokens if isinstance(msg, P.Resume) else 0
    plan = plan_chunk(total, sent, msg.allocated_tokens, BS, msg.dst_blocks)
    if seq == 1:
        h.aux[msg.dst_blocks[0]] = total
    status = Status.Transferring if plan.partial else Status.Success
    h.run(h.status(address, P.StatusMsg(msg.room, status, seq, plan.sent_tokens_after, plan.tokens, total), now))
    return plan


def _finish_copies(h: Harness, now: float = 0.0):
    while h.copies:
        c = h.copies.pop(0)
        h.run(h.m.copied(c.req, c.tokens, c.end, None, now))


def test_a_resume_end_to_end_and_every_block_back():
    h = Harness()
    h.run(h.m.connected("e", "s1"))
    h.run(h.m.request(1, "e", 1, None, 0.0))
    (init,) = h.take("e")
    assert isinstance(init, P.Init) and init.allocated_tokens == 256 and init.session_id == "s1"
    _chunk(h, "e", init, 600, 1)
    assert h.m.reqs[1].tracker.status is Status.WaitingForInput       # until the copy ends
    _finish_copies(h)
    (resume,) = h.take("e")
    assert isinstance(resume, P.Resume) and resume.sent_tokens == 256 and resume.allocated_tokens == 384
    _chunk(h, "e", resume, 600, 2)
    _finish_copies(h)
    req = h.m.collect(1)
    assert req.tracker.history == [Status.Bootstrapping, Status.WaitingForInput, Status.Transferring, Status.Success]
    assert req.nonce in h.completed
    assert h.m.allocator.free_blocks == 8 and h.stats["resumes"] == 1 and h.stats["success"] == 1
    assert h.stats["chunks"] == 2 and h.stats["bytes"] == 600 * 8
    h.m.check_ledger()


def test_an_abort_during_a_copy_quarantines_the_blocks_when_the_copy_ends():
    h = Harness()
    h.run(h.m.connected("e", "s1"))
    h.run(h.m.request(1, "e", 1, None, 0.0))
    (init,) = h.take("e")
    _chunk(h, "e", init, 600, 1)
    h.run(h.m.abort(1, "scheduler gave up"))
    assert [type(m) for m in h.take("e")] == [P.Abort]
    assert h.m.ledger()["request"] == {1: list(init.dst_blocks)}       # the copy still owns them
    _finish_copies(h)
    assert h.m.ledger()["quarantine"] == {("e", 1): list(init.dst_blocks)}
    with pytest.raises(InvalidArgument, match="confirm an abort"):
        h.m.request(1, "e", 1, None, 0.0)
    h.run(h.status("e", P.StatusMsg(1, Status.Failed, flags=P.FLAG_ABORT_ACK), 0.0))
    assert h.m.allocator.free_blocks == 8
    with pytest.raises(TransferFailed):
        h.m.collect(1)
    h.m.check_ledger()


def test_held_blocks_have_a_deadline():
    """Blocks held after a failed write wait for the link to go at most the
    quarantine timeout; then the machine tears the link down and frees them."""
    h = Harness(quarantine_timeout=4.0)
    h.run(h.m.connected("e", "s1"))
    h.run(h.m.request(1, "e", 1, None, 0.0))
    (init,) = h.take("e")
    h.run(h.status("e", P.StatusMsg(1, Status.Failed, reason="write timed out", flags=P.FLAG_BLOCKS_UNSAFE), 0.0))
    assert h.m.ledger()["held"] == {("e", 1): list(init.dst_blocks)}
    h.run(h.m.tick(1.0))                # the clock starts at the first tick
    h.run(h.m.tick(4.5))
    assert h.teardowns == []
    h.run(h.m.tick(5.5))
    assert h.teardowns == ["e"] and h.m.allocator.free_blocks == 8 and h.stats["held_teardowns"] == 1
    h.m.check_ledger()


def test_an_unanswered_abort_tears_the_encoder_down():
    h = Harness(quarantine_timeout=4.0, request_timeout=1.0)
    h.run(h.m.connected("e", "s1"))
    h.run(h.m.connected("f", "s2"))
    h.run(h.m.request(1, "e", 1, None, 0.0))
    h.run(h.m.request(2, "f", 1, None, 0.0))
    h.take("e"), h.take("f")
    h.run(h.m.tick(2.0))                # both time out: ABORTs go out, blocks quarantined
    assert [type(m) for m in h.take("e")] == [P.Abort] and [type(m) for m in h.take("f")] == [P.Abort]
    h.run(h.status("f", P.StatusMsg(2, Status.Failed, flags=P.FLAG_ABORT_ACK), 2.5))     # f answers
    h.run(h.m.tick(6.5))
    assert h.teardowns == ["e"] and h.stats["stuck_encoders"] == 1
    assert h.m.allocator.free_blocks == 8 and h.m.encs["f"].up
    h.m.check_ledger()


def test_a_send_that_cannot_go_out_fails_only_its_room():
    h = Harness()
    h.run(h.m.connected("e", "s1"))
    h.run(h.m.connected("f", "s2"))
    h.down.add("e")
    h.run(h.m.request(1, "e", 1, None, 0.0))
    h.run(h.m.request(2, "f", 1, None, 0.0))
    assert h.m.reqs[1].tracker.status is Status.Failed and h.m.reqs[1].cause == "unreachable"
    assert h.m.reqs[2].tracker.status is Status.WaitingForInput
    assert h.m.allocator.free_blocks == 6
    h.m.check_ledger()


def test_zero_copy_lends_the_blocks_until_released():
    h = Harness(zero_copy=True)
    h.run(h.m.connected("e", "s1"))
    h.run(h.m.request(1, "e", 1, 200, 0.0))
    (init,) = h.take("e")
    assert init.allocated_tokens == 256
    _chunk(h, "e", init, 200, 1)
    assert not h.copies and h.m.reqs[1].tracker.status is Status.Success
    lease = h.leases[h.m.reqs[1].nonce]
    h.m.collect(1)
    assert h.m.ledger()["lease"] == {lease: list(init.dst_blocks)}
    h.run(h.m.lease_returned(lease))
    assert h.m.allocator.free_blocks == 8
    h.m.check_ledger()


def test_another_encoders_status_never_touches_a_room():
    h = Harness()
    h.run(h.m.connected("e", "s1"))
    h.run(h.m.connected("f", "s2"))
    h.run(h.m.request(1, "e", 1, None, 0.0))
    (init,) = h.take("e")
    h.aux[init.dst_blocks[0]] = 100
    h.run(h.status("f", P.StatusMsg(1, Status.Success, 1, 100, 100, 100), 0.0))
    h.run(h.status("f", P.StatusMsg(1, Status.Failed, reason="not yours"), 0.0))
    assert h.m.reqs[1].tracker.status is Status.WaitingForInput and not h.copies


def test_a_corrupt_aux_fails_the_room_with_an_abort():
    h = Harness()
    h.run(h.m.connected("e", "s1"))
    h.run(h.m.request(1, "e", 1, None, 0.0))
    (init,) = h.take("e")
    h.aux[init.dst_blocks[0]] = 1 << 30
    h.run(h.status("e", P.StatusMsg(1, Status.Success, 1, 100, 100, 100), 0.0))
    assert h.m.reqs[1].cause == "bad_message" and "aux" in h.m.reqs[1].reason
    assert [type(m) for m in h.take("e")] == [P.Abort]


def test_a_lost_link_fails_its_rooms_and_frees_all_it_parked():
    h = Harness(num_blocks=8)
    h.run(h.m.connected("e", "s1"))
    h.run(h.m.connected("f", "s2"))
    for room in range(4):
        h.run(h.m.request(room, "e", 1, None, 0.0))
    h.run(h.m.request(9, "f", 1, None, 0.0))             # waits for blocks
    assert h.m.reqs[9].waiting_alloc
    h.run(h.m.abort(0, "gave up"))                        # 2 blocks quarantined for e
    h.run(h.m.link_lost("e", "test"))
    assert all(h.m.reqs[r].cause == "peer_lost" for r in (1, 2, 3)) and h.m.reqs[0].cause == "aborted"
    assert h.m.reqs[9].tracker.status is Status.WaitingForInput and h.m.allocator.free_blocks == 6
    h.m.check_ledger()


# ---------------------------------------------------------------- stateful
ROOMS, ENCS, BLOCKS = 5, 2, 8
ADDRS = [f"enc{i}" for i in range(ENCS)]


class MachineRooms(RuleBasedStateMachine):
    """Random interleavings of requests, STATUS, PROGRESS, copies ending (or
    failing) at any time, aborts, timeouts, link loss, reconnects, sends that
    cannot go out, results collected and released.  After every step each
    block has exactly one owner and no request is Success before all its
    tokens were copied; at the end nothing is left anywhere."""

    SHARE = 0

    def __init__(self):
        super().__init__()
        self.h = Harness(num_blocks=BLOCKS, zero_copy=True, share_limit=self.SHARE)
        self.now = 0.0
        self.total: dict = {}                   # room -> tokens of its current request
        self.asked: dict = {}                   # (address, room) -> INIT / RESUME not answered yet
        self.seq: dict = {}                     # (address, room, nonce) -> chunks written
        self.aborted = {a: set() for a in ADDRS}
        self.landed: dict = {}                  # nonce -> tokens copied out (or lent)
        self.sessions = 0
        self.kept: list = []                    # leases of zero-copy results collected and not released

    def _pump(self):
        for a in ADDRS:
            for m in self.h.take(a):
                if isinstance(m, (P.Init, P.Resume)):
                    self.asked[(a, m.room)] = m
                elif isinstance(m, P.Abort):
                    self.asked.pop((a, m.room), None)
                    self.aborted[a].add(m.room)

    def _run(self, actions):
        self.h.run(actions)
        for a in ADDRS:
            if not self.h.m.encs.get(a) or not self.h.m.encs[a].up:
                self.asked = {k: v for k, v in self.asked.items() if k[0] != a}
                self.aborted[a] = set()
        self._pump()

    @initialize()
    def connect_all(self):
        for a in ADDRS:
            self.sessions += 1
            self._run(self.h.m.connected(a, f"s{self.sessions}"))

    @rule(room=st.integers(0, ROOMS - 1), i=st.integers(0, ENCS - 1), tokens=st.integers(1, 3 * BLOCKS * BS),
          hint=st.booleans())
    def request(self, room, i, tokens, hint):
        m = self.h.m
        old = m.reqs.get(room)
        if (old is not None and (old.tracker.status is not Status.Failed or old.copying)) or \
                any(room in e.quarantine or room in e.held for e in m.encs.values()):
            with pytest.raises(InvalidArgument):
                m.request(room, ADDRS[i], 1, None, self.now)
            return
        self.total[room] = tokens
        self._run(m.request(room, ADDRS[i], 1, tokens if hint else None, self.now))

    @precondition(lambda self: self.asked)
    @rule(data=st.data(), progress=st.booleans())
    def encoder_writes_a_chunk(self, data, progress):
        a, room = data.draw(st.sampled_from(sorted(self.asked)))
        msg = self.asked.pop((a, room))
        total = self.total[room]
        key = (a, room, msg.nonce)
        seq = self.seq[key] = self.seq.get(key, 0) + 1
        if seq == 1:
            self.h.aux[msg.dst_blocks[0]] = total
        sent = msg.sent_tokens if isinstance(msg, P.Resume) else 0
        plan = plan_chunk(total, sent, msg.allocated_tokens, BS, msg.dst_blocks)
        nblocks = plan.src_block_end - plan.src_block_start
        if progress and nblocks >= 2:
            k = data.draw(st.integers(1, nblocks - 1))
            self._run(self.h.progress(a, P.Progress(room, seq, k * BS)))
        status = Status.Transferring if plan.partial else Status.Success
        self._run(self.h.status(a, P.StatusMsg(room, status, seq, plan.sent_tokens_after, plan.tokens, total),
                                self.now))

    @precondition(lambda self: self.h.copies)
    @rule(data=st.data(), fails=st.booleans())
    def a_copy_ends(self, data, fails):
        c = self.h.copies.pop(data.draw(st.integers(0, len(self.h.copies) - 1)))
        if not fails and not c.req.tracker.status.terminal:
            self.landed[c.req.nonce] = self.landed.get(c.req.nonce, 0) + c.tokens
        self._run(self.h.m.copied(c.req, c.tokens, c.end, "test: copy failed" if fails else None, self.now))

    @precondition(lambda self: self.asked)
    @rule(data=st.data(), unsafe=st.booleans())
    def encoder_fails_a_room(self, data, unsafe):
        a, room = data.draw(st.sampled_from(sorted(self.asked)))
        self.asked.pop((a, room))
        self._run(self.h.status(a, P.StatusMsg(room, Status.Failed, reason="encoder failed it",
                                               flags=P.FLAG_BLOCKS_UNSAFE if unsafe else 0), self.now))

    @precondition(lambda self: self.asked)
    @rule(data=st.data())
    def encoder_sends_a_wrong_status(self, data):
        a, room = data.draw(st.sampled_from(sorted(self.asked)))
        self._run(self.h.status(a, P.StatusMsg(room, Status.Transferring, 99, 1, 1, 1), self.now))

    @rule(i=st.integers(0, ENCS - 1))
    def encoder_acknowledges_aborts(self, i):
        a = ADDRS[i]
        for room in sorted(self.aborted[a]):
            self.aborted[a].discard(room)
            self._run(self.h.status(a, P.StatusMsg(room, Status.Failed, flags=P.FLAG_ABORT_ACK), self.now))

    @rule(room=st.integers(0, ROOMS - 1))
    def scheduler_aborts(self, room):
        self._run(self.h.m.abort(room, "scheduler gave up"))

    @rule(dt=st.sampled_from([0.5, 3.0, 11.0]))
    def time_passes(self, dt):
        self.now += dt
        self._run(self.h.m.tick(self.now))

    @rule(i=st.integers(0, ENCS - 1))
    def link_is_lost(self, i):
        if self.h.m.encs[ADDRS[i]].up:
            self._run(self.h.m.link_lost(ADDRS[i], "test: link lost"))

    @rule(i=st.integers(0, ENCS - 1))
    def reconnect(self, i):
        a = ADDRS[i]
        self.h.down.discard(a)
        if not self.h.m.encs[a].up:
            self.sessions += 1
            self._run(self.h.m.connected(a, f"s{self.sessions}"))

    @rule(i=st.integers(0, ENCS - 1))
    def sends_to_an_encoder_fail(self, i):
        self.h.down.add(ADDRS[i])

    @rule(i=st.integers(0, ENCS - 1))
    def handshake_fails(self, i):
        a = ADDRS[i]
        if not self.h.m.encs[a].up:
            self._run(self.h.m.connect_failed(a, "test: refused"))

    @rule(room=st.integers(0, ROOMS - 1), release=st.booleans())
    def collect(self, room, release):
        m = self.h.m
        req = m.reqs.get(room)
        if req is None or not req.tracker.status.terminal or req.copying:
            return
        if req.tracker.status is Status.Failed:
            with pytest.raises(TransferFailed):
                m.collect(room)
            return
        m.collect(room)
        lease = self.h.leases.pop(req.nonce, None)
        if release and lease is not None:
            self._run(m.lease_returned(lease))
        elif lease is not None:
            self.kept.append(lease)             # the caller keeps the result a while

    @precondition(lambda self: self.kept)
    @rule(data=st.data())
    def release_a_result(self, data):
        lease = self.kept.pop(data.draw(st.integers(0, len(self.kept) - 1)))
        self._run(self.h.m.lease_returned(lease))

    # -- invariants
    @invariant()
    def every_block_has_exactly_one_owner(self):
        self.h.m.check_ledger()

    @invariant()
    def every_phase_change_is_in_the_table(self):
        self.h.check_phases()

    @invariant()
    def no_result_before_all_its_tokens_landed(self):
        for room, req in self.h.m.reqs.items():
            if req.tracker.status is Status.Success:
                assert req.sent_tokens == req.total_tokens == self.total[room]
                assert req.nonce in self.h.completed
                if req.chunks > 1 or req.nonce not in self.h.leases:
                    assert self.landed.get(req.nonce, 0) == self.total[room]
            else:
                assert req.nonce not in self.h.completed

    @invariant()
    def no_encoder_holds_more_than_its_share(self):
        m = self.h.m
        if m.share_limit:
            assert all(m.charged(e) <= m.share_limit for e in m.encs.values())

    @invariant()
    def counts_agree(self):
        s = self.h.stats
        assert s["success"] + s["failed"] <= s["requests"]

    def teardown(self):
        m = self.h.m
        for lease in self.kept + list(self.h.leases.values()):
            self.h.run(m.lease_returned(lease))
        self.h.run(m.close())
        while self.h.copies:
            c = self.h.copies.pop()
            self.h.run(m.copied(c.req, c.tokens, c.end, None, self.now))
        m.check_ledger()
        assert m.allocator.free_blocks == BLOCKS
        assert not any(e.quarantine or e.held for e in m.encs.values())
        assert all(r.tracker.status.terminal for r in m.reqs.values())
        self.h.check_phases()
        assert all(r.phase in (Phase.SUCCEEDED, Phase.FAILED) for r in m.reqs.values())


class MachineRoomsCapped(MachineRooms):
    SHARE = BLOCKS // 2


TestMachineRooms, TestMachineRoomsCapped = state_machine_tests(MachineRooms, MachineRoomsCapped, examples=150, steps=60)


def test_the_phase_table_is_closed_and_an_illegal_change_raises():
    """Every phase has a row, every target is a phase, the terminal phases lead
    nowhere; a change the table lacks raises PhaseError and changes nothing."""
    assert set(TRANSITIONS) == set(Phase)
    assert all(set(row) <= set(Phase) for row in TRANSITIONS.values())
    assert TRANSITIONS[Phase.SUCCEEDED] == TRANSITIONS[Phase.FAILED] == {}
    h = Harness()
    h.run(h.m.connected("e", "s1"))
    h.run(h.m.request(1, "e", 1, None, 0.0))
    req = h.m.reqs[1]
    assert req.phase is Phase.ASKED
    for bad in (Phase.BOOTSTRAPPING, Phase.WAITING_BLOCKS, Phase.FAILED_COPYING, Phase.ASKED):
        with pytest.raises(PhaseError, match=f"ASKED -> {bad.name}"):
            LanguageRooms._set_phase(req, bad)
        assert req.phase is Phase.ASKED
    h.run(h.m.abort(1, "test"))
    assert req.phase is Phase.FAILED
    with pytest.raises(PhaseError):
        LanguageRooms._set_phase(req, Phase.ASKED)
    lone = Req(2, 1, 0.0, 1.0, h.m.enc("e"), 1, None)
    assert lone.phase is Phase.BOOTSTRAPPING
    with pytest.raises(PhaseError):
        LanguageRooms._set_phase(lone, Phase.COPYING)
    h.check_phases()


def test_handle_takes_the_events_and_the_methods_are_its_wrappers():
    """One entry: an event dataclass in, the actions out; the per-event methods
    give the same answers; an object that is no event raises TypeError."""
    a, b = Harness(), Harness()
    a.run(a.m.handle(RL.LinkUp("e", "s1")))
    b.run(b.m.connected("e", "s1"))
    a.run(a.m.handle(RL.RequestRoom(1, "e", 1, None, 0.0)))
    b.run(b.m.request(1, "e", 1, None, 0.0))
    (ia,), (ib,) = a.take("e"), b.take("e")
    assert ia == ib and isinstance(ia, P.Init)
    a.aux[ia.dst_blocks[0]] = b.aux[ib.dst_blocks[0]] = 100
    msg = P.StatusMsg(1, Status.Success, 1, 100, 100, 100)
    a.run(a.m.handle(RL.StatusReceived("e", msg, 0.0, a.read_aux("e", msg))))
    b.run(b.m.status("e", msg, 0.0, b.read_aux("e", msg)))
    (ca,), (cb,) = a.copies, b.copies
    assert (ca.blocks, ca.tokens, ca.end) == (cb.blocks, cb.tokens, cb.end) == (list(ia.dst_blocks), 100, (100, True))
    a.run(a.m.handle(RL.Copied(ca.req, ca.tokens, ca.end, None, 0.0)))
    b.run(b.m.copied(cb.req, cb.tokens, cb.end, None, 0.0))
    assert a.m.reqs[1].phase is b.m.reqs[1].phase is Phase.SUCCEEDED
    with pytest.raises(TypeError, match="not an event"):
        a.m.handle(msg)
    a.m.check_ledger()


def test_forget_drops_a_failed_request_and_nothing_else():
    """The endpoint never deletes a machine record itself: Forget drops a failed
    request uncollected, and leaves a live or succeeded one alone."""
    h = Harness()
    h.run(h.m.connected("e", "s1"))
    h.run(h.m.request(1, "e", 1, None, 0.0))
    assert h.m.forget(1) == [] and 1 in h.m.reqs                    # live: stays
    h.run(h.m.abort(1, "test"))
    h.run(h.m.handle(RL.Forget(1)))
    assert 1 not in h.m.reqs
    assert h.m.forget(1) == []                                      # unknown: nothing happens
    h.m.check_ledger()
    h.check_phases()


def test_the_aux_record_comes_in_the_event_as_data():
    """The machine never reads pool memory: ``aux_block`` names the block whose
    aux a STATUS or PROGRESS needs, the endpoint reads it and hands it in the
    event; a first chunk's STATUS without it fails the room as a bad message."""
    h = Harness()
    h.run(h.m.connected("e", "s1"))
    h.run(h.m.request(1, "e", 1, None, 0.0))
    (init,) = h.take("e")
    msg = P.StatusMsg(1, Status.Success, 1, 100, 100, 100)
    assert h.m.aux_block("e", msg) == init.dst_blocks[0]
    assert h.m.aux_block("e", P.Progress(1, 1, BS)) == init.dst_blocks[0]
    assert h.m.aux_block("f", msg) is None                                  # not asked of that encoder
    assert h.m.aux_block("e", P.StatusMsg(1, Status.Failed)) is None        # a failure reads nothing
    h.run(h.m.handle(RL.StatusReceived("e", msg, 0.0, (100, "the aux record"))))
    assert h.m.reqs[1].aux == "the aux record" and h.m.reqs[1].total_tokens == 100
    assert h.m.aux_block("e", msg) is None                                  # read once, kept for the request
    _finish_copies(h)
    h.run(h.m.request(2, "e", 1, None, 0.0))
    h.take("e")
    h.run(h.m.handle(RL.StatusReceived("e", P.StatusMsg(2, Status.Success, 1, 100, 100, 100), 0.0)))
    req = h.m.reqs[2]
    assert req.code is FailCode.BAD_MESSAGE and "aux" in req.reason
    assert [type(m) for m in h.take("e")] == [P.Abort]
    h.m.check_ledger()
    h.check_phases()


def test_the_machine_counts_as_data_and_the_endpoint_records_them():
    """Counts are data in the machine's Tally during its events: the endpoint's
    EndpointStats sees nothing until the tally is recorded, then all of it."""
    stats = EndpointStats("language", CollectorRegistry())
    m = LanguageRooms(num_blocks=8, block_size=BS, row_bytes=8, default_allocate_tokens=256, stats=stats)
    m.connected("e", "s1")
    (send,) = m.request(1, "e", 1, None, 0.0)
    copy = next(a for a in m.status("e", P.StatusMsg(1, Status.Success, 1, 100, 100, 100), 0.0, (100, None))
                if isinstance(a, Copy))
    m.copied(copy.req, copy.tokens, copy.end, None, 1.0)
    m.request(2, "e", 1, None, 1.0)
    m.abort(2, "test")
    assert dict(stats) == {} and m.stats                                    # nothing recorded inside the events
    m.stats.record()
    assert (stats["requests"], stats["success"], stats["failed"], stats["chunks"]) == (2, 1, 1, 1)
    assert stats["bytes"] == 100 * 8 and not m.stats                        # the tally is empty again
    m.stats.record()
    assert stats["requests"] == 2
