"""The vLLM consumer's item tracker (embresume/integrations/_items.py) on its own:
no vLLM, no endpoint, no region, no clock.

The tests play the role object (they carry out the actions the tracker
returns: a Start is answered Started or StartFailed, a Land Landed or NoRoom,
within a landing region of a few slots whose evictions ask the tracker) and
vLLM's scheduler (requests need items, has_cache_item reserves, allocation
names loads, workers report them, requests finish, steps end, time passes).
"""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from embresume.errors import FailCode
from embresume.integrations import _items as I
from embresume.status import Status

from conftest import state_machine_tests

P = I.Phase
HASHES = ["h0", "h1", "h2", "h3"]
RIDS = ["r0", "r1", "r2", "r3", "r4"]
MAX_ATTEMPTS = 3
SLOTS = 2
REPORTS = 2


class Harness:
    """The role object's side: runs the tracker's actions against a fake region and pool."""

    def __init__(self):
        self.t = I.ItemTracker(max_attempts=MAX_ATTEMPTS, failover_timeout=5.0, load_timeout=30.0)
        self.now = 0.0
        self.region: dict[str, int] = {}      # mm_hash -> pins
        self.results: set[str] = set()        # received results held (pool blocks)
        self.refuse_start = False
        self.hold_landing = False             # the region is busy elsewhere: every Land finds no room
        self.starts: dict[str, int] = {}
        self.next_load = 0

    def handle(self, ev) -> None:
        self.run(self.t.handle(ev))

    def run(self, actions) -> None:
        todo = list(actions)
        while todo:
            a = todo.pop(0)
            if isinstance(a, I.Start):
                self.starts[a.mm_hash] = self.starts.get(a.mm_hash, 0) + 1
                assert a.attempt <= MAX_ATTEMPTS
                if self.refuse_start:
                    todo += self.t.handle(I.StartFailed(a.mm_hash, self.now, "refused"))
                else:
                    todo += self.t.handle(I.Started(a.mm_hash, self.now))
            elif isinstance(a, I.Land):
                todo += self._land(a.mm_hash)
            elif isinstance(a, I.Release):
                self.results.discard(a.mm_hash)
            elif isinstance(a, I.Pin):
                self.region[a.mm_hash] += 1
            elif isinstance(a, I.Unpin):
                assert self.region[a.mm_hash] > 0
                self.region[a.mm_hash] -= 1
            elif isinstance(a, (I.Discard, I.Retrying, I.GaveUp)):
                pass
            else:  # pragma: no cover
                raise AssertionError(f"unknown action {a!r}")

    def _land(self, h: str) -> list:
        if self.t.phase(h) is not P.RECEIVED:
            return []                                 # dropped earlier in the same batch
        assert h in self.results
        out = []
        if self.hold_landing:
            return self.t.handle(I.NoRoom(h, self.now))
        while len(self.region) >= SLOTS:
            victim = next((k for k, pins in self.region.items()
                           if pins == 0 and self.t.evictable(k, for_hash=h)), None)
            if victim is None:
                return out + self.t.handle(I.NoRoom(h, self.now))
            assert self.t.phase(victim) is P.LANDED      # a pinned item is never evicted
            del self.region[victim]
            out += self.t.handle(I.Evicted(victim))
        self.region[h] = 0
        self.results.discard(h)
        return out + self.t.handle(I.Landed(h))


class ItemMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.h = Harness()
        self.live: dict[str, set] = {}        # rid -> hashes it needs (requests not finished)
        self.loads: list[int] = []            # load ids out (one entry per report owed)
        self.step_reserved: set = set()

    @property
    def t(self):
        return self.h.t

    # ------------------------------------------------------------ vLLM's scheduler
    @rule(rid=st.sampled_from(RIDS), h=st.sampled_from(HASHES))
    def need(self, rid, h):
        self.live.setdefault(rid, set()).add(h)
        self.h.handle(I.Need(rid, h, "tcp://enc", 10, 8, self.h.now))

    @rule(h=st.sampled_from(HASHES))
    def has_cache_item(self, h):
        if self.t.present(h):
            self.h.handle(I.Reserve(h))
            self.step_reserved.add(h)

    @rule(data=st.data())
    def alloc(self, data):
        reserved = sorted(h for h in self.step_reserved if self.t.phase(h) is P.PINNED)
        if not reserved:
            return
        h = data.draw(st.sampled_from(reserved))
        rid = data.draw(st.sampled_from(RIDS))
        reports = data.draw(st.sampled_from([REPORTS, 0]))     # 0: nobody reports, a lease ends it
        load_id = self.h.next_load
        self.h.next_load += 1
        self.h.handle(I.Alloc(rid, h, load_id, reports, lease_steps=3))
        self.loads += [load_id] * reports

    @rule(rid=st.sampled_from(RIDS), h=st.sampled_from(HASHES))
    def local_encode(self, rid, h):
        if not self.t.present(h):
            self.h.handle(I.LocalEncode(rid, h))

    @rule()
    def step_end(self):
        self.h.handle(I.StepEnd())
        self.step_reserved.clear()

    @precondition(lambda self: self.loads)
    @rule(data=st.data())
    def load_reported(self, data):
        i = data.draw(st.integers(0, len(self.loads) - 1))
        self.h.handle(I.LoadReported(self.loads.pop(i)))

    @rule(rid=st.sampled_from(RIDS))
    def request_finished(self, rid):
        hashes = tuple(sorted(self.live.pop(rid, set())))
        self.h.handle(I.RequestFinished(rid, hashes))

    # ------------------------------------------------------------ the endpoint and time
    @rule(h=st.sampled_from(HASHES),
          outcome=st.sampled_from(["success", "failed", "busy", "gone", "waiting", "running"]))
    def polled(self, h, outcome):
        if self.t.phase(h) is not P.TRANSFERRING:
            return
        status, code = {"success": (Status.Success, None), "failed": (Status.Failed, FailCode.ERROR),
                        "busy": (Status.Failed, FailCode.BUSY), "gone": (Status.Failed, FailCode.NOT_PUBLISHED),
                        "waiting": (Status.WaitingForInput, None), "running": (Status.Transferring, None)}[outcome]
        if outcome == "success":
            self.h.results.add(h)
        it = self.t.get(h)
        if not self.t.poll_matters(it, status, self.h.now):
            # the shell makes no event of such a poll: it must be one that changes nothing
            before = (it.phase, it.attempts, it.reason, it.started, it.deadline)
            assert self.t.handle(I.Polled(h, self.h.now, status, code, outcome)) == []
            assert (it.phase, it.attempts, it.reason, it.started, it.deadline) == before
            return
        self.h.handle(I.Polled(h, self.h.now, status, code, outcome))

    @rule(h=st.sampled_from(HASHES))
    def rejected(self, h):
        if self.t.phase(h) is P.RECEIVED:
            self.h.handle(I.Rejected(h, "wrong size"))

    @rule(dt=st.sampled_from([0.01, 0.2, 1.0, 6.0, 40.0]))
    def tick(self, dt):
        self.h.now += dt
        self.h.handle(I.Tick(self.h.now))

    @rule(refuse=st.booleans())
    def endpoint_refuses(self, refuse):
        self.h.refuse_start = refuse

    @rule(hold=st.booleans())
    def region_busy(self, hold):
        self.h.hold_landing = hold

    # ------------------------------------------------------------ invariants
    @invariant()
    def one_phase_each(self):
        for h, it in self.t.items.items():
            assert it.mm_hash == h and isinstance(it.phase, P)
        # the region holds exactly the landed and pinned items
        assert set(self.h.region) == {h for h, it in self.t.items.items() if it.phase in (P.LANDED, P.PINNED)}

    @invariant()
    def phase_index_matches(self):
        # the tracker's by-phase index (what the hooks read) is the items, grouped by phase
        for ph in P:
            assert {it.mm_hash for it in self.t.in_phase(ph)} == {h for h, it in self.t.items.items()
                                                                  if it.phase is ph}
        assert self.t.busy() == any(it.phase is not P.LANDED for it in self.t.items.values())

    @invariant()
    def pins_match(self):
        for h, it in self.t.items.items():
            if it.phase is P.PINNED:
                assert it.reserved or it.loads
                assert self.h.region[h] == 1
            elif it.phase is P.LANDED:
                assert not it.reserved and not it.loads and self.h.region[h] == 0

    @invariant()
    def results_held_only_while_received(self):
        assert self.h.results == {h for h, it in self.t.items.items() if it.phase is P.RECEIVED}

    @invariant()
    def attempts_bounded(self):
        for it in self.t.items.values():
            assert 0 <= it.attempts <= MAX_ATTEMPTS

    def teardown(self):
        # every request finishes, every load is reported, steps end and time passes: only idle
        # landed items are left (the region's cache), nothing in flight, no result held
        for rid in list(self.live):
            self.request_finished(rid)
        self.step_end()
        for load_id in self.loads:
            self.h.handle(I.LoadReported(load_id))
        self.loads = []
        self.h.hold_landing = False
        for _ in range(3):
            self.step_end()                           # leases run out
        for _ in range(3):
            self.tick(40.0)
        for h in [h for h, it in self.t.items.items() if it.phase is P.TRANSFERRING]:
            self.h.handle(I.Polled(h, self.h.now, Status.Transferring))
        left = {h: it.phase for h, it in self.t.items.items() if it.phase is not P.LANDED}
        assert not left, left
        assert not self.h.results and not self.t.busy()
        assert all(pins == 0 for pins in self.h.region.values())


(TestItemMachine,) = state_machine_tests(ItemMachine, examples=150, steps=60)


def test_a_transition_the_table_lacks_raises():
    t = I.ItemTracker(max_attempts=3, failover_timeout=5.0, load_timeout=30.0)
    t.handle(I.Need("r", "h", "tcp://e", 10, 8, 0.0))
    t.handle(I.Started("h", 0.0))
    with pytest.raises(I.TransitionError):
        t.handle(I.Reserve("h"))                     # transferring: nothing to report present
    with pytest.raises(I.TransitionError):
        t.handle(I.Landed("h"))                      # transferring -> landed skips received


def test_a_pinned_item_is_never_evicted():
    t = I.ItemTracker(max_attempts=3, failover_timeout=5.0, load_timeout=30.0)
    t.handle(I.Need("r", "h", "tcp://e", 10, 8, 0.0))
    t.handle(I.Started("h", 0.0))
    assert t.handle(I.Polled("h", 0.1, Status.Success)) == [I.Land("h")]
    t.handle(I.Landed("h"))
    assert not t.evictable("h")                       # r waits for it
    assert t.handle(I.Reserve("h")) == [I.Pin("h")]
    t.handle(I.Alloc("r", "h", 7, 2))
    t.handle(I.StepEnd())
    assert t.phase("h") is P.PINNED and not t.evictable("h")
    with pytest.raises(I.TransitionError):
        t.handle(I.Evicted("h"))
    t.handle(I.LoadReported(7))
    assert t.handle(I.LoadReported(7)) == [I.Unpin("h")]
    assert t.phase("h") is P.LANDED and t.evictable("h")


def test_busy_refusals_are_no_attempts_and_not_published_is_final():
    t = I.ItemTracker(max_attempts=3, failover_timeout=5.0, load_timeout=30.0)
    t.handle(I.Need("r", "h", "tcp://e", 10, 8, 0.0))
    t.handle(I.Started("h", 0.0))
    for k in range(5):
        t.handle(I.Polled("h", k + 0.1, Status.Failed, FailCode.BUSY, "busy"))
        assert t.phase("h") is P.RETRY_WAIT and t.get("h").attempts == 0
        [start] = t.handle(I.Tick(k + 0.5))
        assert start.attempt == 1
        t.handle(I.Started("h", k + 0.5))
    out = t.handle(I.Polled("h", 6.0, Status.Failed, FailCode.NOT_PUBLISHED, "withdrawn"))
    assert t.phase("h") is P.FAILED and [type(a) for a in out] == [I.GaveUp]


def test_two_requests_of_two_items_on_a_two_item_region_do_not_deadlock():
    """A's first item and B's first item fill a region of two; before, neither second item
    could land (each landed item was needed by a waiting request, so not evictable) and
    both requests waited out load_timeout, then recomputed or failed.  Now the oldest
    request gets its room: B's landed item makes way (transferred again later, no attempt
    counted) and B's second item waits for A's loads instead of evicting A's items."""
    h = Harness()
    t = h.t
    for rid, items, now in (("A", ("a1", "a2"), 0.0), ("B", ("b1", "b2"), 1.0)):
        h.now = now
        for item in items:
            h.handle(I.Need(rid, item, "tcp://e", 10, 8, now))
    h.now = 2.0
    for item in ("a1", "b1", "a2"):
        h.results.add(item)
        h.handle(I.Polled(item, h.now, Status.Success))
    assert t.present("a1") and t.present("a2")               # A's items: both landed
    assert t.phase("b1") is P.TRANSFERRING and h.starts["b1"] == 2 and t.get("b1").attempts == 1
    h.results.add("b2")
    h.handle(I.Polled("b2", h.now, Status.Success))
    assert t.phase("b2") is P.RECEIVED                         # younger: waits, evicts none of A's
    assert set(h.region) == {"a1", "a2"}
    # A is scheduled: reserved, allocated, loaded, finished; then B's items land
    for item in ("a1", "a2"):
        h.handle(I.Reserve(item))
        h.handle(I.Alloc("A", item, {"a1": 1, "a2": 2}[item], 1, 3))
    h.handle(I.StepEnd())
    h.handle(I.LoadReported(1))
    h.handle(I.LoadReported(2))
    h.handle(I.RequestFinished("A", ("a1", "a2")))
    h.handle(I.Tick(3.0))
    h.results.add("b1")
    h.handle(I.Polled("b1", 3.0, Status.Success))
    assert t.present("b1") and t.present("b2") and set(h.region) == {"b1", "b2"}
    assert h.starts == {"a1": 1, "a2": 1, "b1": 2, "b2": 1}     # one extra transfer, no failure
