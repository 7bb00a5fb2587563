"""One stuck or hostile peer never stalls the others (issue 18): each row of
the issue's table is a test here.

| # | what one peer does | what the others must see |
| --- | --- | --- |
| 1 | an encoder dies while most requests wait for pool space | every room of it Failed 'encoder lost', within peer_timeout; all blocks back; the monitor never crashes |
| 2 | an encoder heartbeats but never answers INIT or ABORT | its quarantined blocks are freed after the quarantine timeout (the link is torn down); an honest encoder's requests then succeed |
| 3 | a language peer's ring looks full for good | the encoder's heartbeats to everyone else keep going; the stuck peer is torn down after peer_timeout |
| 4 | an encoder stops reading its ring | ``request()`` never blocks; another encoder's rooms are served; the stuck link is torn down |
| 5 | a peer INITs thousands of rooms with many blocks each | the encoder keeps at most the session's bound of live rooms/blocks; the rest are refused to it |
| 6 | a flood of keyless tcp hellos whose refusals are never read | refusals are rate-bounded (the rest dropped and counted) |
| 7 | a peer floods its ring with valid heartbeats | it is disconnected past the no-op frame bound; others are served |
| 8 | a session of another TP group INITs a room that is gathering its ranks | it alone is refused; the room's real ranks get their data |
| 9 | a pool memfd sealed with SHRINK only | refused (SHRINK, GROW and SEAL are required) |

Every wait is bounded; endpoints and raw peers are closed in ``finally``;
nothing is left in /dev/shm (conftest's autouse fixture).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time

import pytest

from embresume import protocol as P
from embresume.blocks import BlockLayout
from embresume.encoder import EncoderEndpoint
from embresume.errors import PeerError
from embresume.harness import EncoderProcess
from embresume.ipc import unix
from embresume.ipc.ring import ShmRing
from embresume.ipc.shm import ShmSegment
from embresume.language import LanguageEndpoint
from embresume.status import Status
from embresume.synthetic import SyntheticData

from conftest import layout_dict, make_config, wait_until

HIDDEN = 256






class RawRank:
    """A hand-made same-host language rank: a complete handshake with its own
    pool and rings, then whatever the test makes it do (read or not, write
    anything into its ring, make the encoder's ring look full)."""

    def __init__(self, enc: EncoderEndpoint, cfg, session: str, group=None, read: bool = True):
        self.sock = unix.connect(enc.unix_name, 5.0)
        self.seg = self.l2e = self.e2l = None
        self.session = session
        self.received: list = []
        self._stop = threading.Event()
        self._reader = None
        try:
            layout = layout_dict(cfg)
            hello = {"phase": "hello", "layout": layout, "offer": ["shm"]}
            if group is not None:
                hello["group"] = group
            self._send_register("", hello)
            assert self._reply().desc["phase"] == "hello"
            nbytes = BlockLayout.from_dict(layout).nbytes
            self.seg = ShmSegment.create(nbytes, prefault=False)
            self.l2e, self.e2l = ShmRing.create(cfg.ring_bytes), ShmRing.create(cfg.ring_bytes)
            desc, fds = unix.pack_fds({"phase": "pool",
                                       "pool": {"fd": unix.Fd(self.seg.fd), "nbytes": nbytes, "layout": layout},
                                       "rings": {"l2e": [unix.Fd(x) for x in self.l2e.handles()],
                                                 "e2l": [unix.Fd(x) for x in self.e2l.handles()]}})
            self._send_register("shm", desc, fds)
            ready = self._reply()
            assert ready.desc["phase"] == "ready", ready
            if read:
                self._reader = threading.Thread(target=self._read, daemon=True)
                self._reader.start()
            self._beater = threading.Thread(target=self._beat, daemon=True)   # it looks alive
            self._beater.start()
        except BaseException:
            self.close()
            raise

    def _send_register(self, transport, desc, fds=()):
        unix.send(self.sock, P.encode(P.Register(P.Role.LANGUAGE, self.session, "n", os.getpid(), 0, transport,
                                                 desc)), fds)

    def _reply(self):
        data, fds = unix.recv_blocking(self.sock, time.monotonic() + 5)
        unix.close_all(fds)
        return P.decode(data)

    def _beat(self):
        seq = 0
        while not self._stop.wait(0.1):
            seq += 1
            try:
                self.l2e.try_send(P.encode(P.Heartbeat(seq, time.time_ns())))
            except Exception:
                return

    def _read(self):
        while not self._stop.is_set():
            try:
                data = self.e2l.recv(timeout=0.2)
            except Exception:
                return
            if data is not None:
                try:
                    self.received.append(P.decode(data))
                except Exception:
                    pass

    def send(self, msg, timeout: float = 5.0) -> None:
        self.l2e.send(P.encode(msg), timeout=timeout)

    def make_ring_look_full(self) -> None:
        """The encoder's ring to us: head 0, tail = capacity (we own the segment)."""
        from embresume.ipc.ring import _HEAD, _TAIL
        self.e2l._put(_HEAD, 0)
        self.e2l._put(_TAIL, self.e2l.capacity)

    def failed(self) -> list:
        return [m for m in list(self.received) if isinstance(m, P.StatusMsg) and m.status is Status.Failed]

    def close(self) -> None:
        self._stop.set()
        for t in (self._reader, getattr(self, "_beater", None)):
            if t is not None:
                t.join(5)
        try:
            if self.l2e is not None:
                self.l2e.close_writer()
        except Exception:
            pass
        self.sock.close()
        for r in (self.l2e, self.e2l):
            if r is not None:
                r.close()
        if self.seg is not None:
            self.seg.close()


def _init(session, room, blocks, required=1, nonce=1, block=128):
    return P.Init(room, "e", 0, session, tuple(blocks), required, len(blocks) * block, nonce)


# ---------------------------------------------------------------- row 1
def test_row1_encoder_death_while_requests_wait_for_blocks(caplog):
    """8 requests, 2 hold the pool, 6 wait for it; the encoder is killed (-9).
    Every room fails as 'encoder lost' within peer_timeout (+ slack), all
    blocks are back, and the monitor never raised."""
    cfg = make_config("shm", pool_blocks=16, default_allocate_tokens=1024, peer_timeout=1.5, request_timeout=60.0)
    data_spec = (HIDDEN, "bf16", 4000, 1, "cpu")
    caplog.set_level(logging.ERROR, logger="embresume.language")
    with EncoderProcess(cfg, data_spec=data_spec) as enc:
        with LanguageEndpoint(cfg) as lang:
            rooms = list(range(100, 108))
            for room in rooms:
                lang.request(room)
            assert wait_until(lambda: sum(lang.poll(r) is Status.WaitingForInput for r in rooms) == 2, 10)
            assert sum(lang.poll(r) is Status.Bootstrapping for r in rooms) == 6
            enc.kill()
            t0 = time.monotonic()
            for room in rooms:
                assert lang.wait(room, cfg.peer_timeout + 5) is Status.Failed, (room, lang.poll(room).name)
            took = time.monotonic() - t0
            for room in rooms:
                assert "encoder lost" in lang.failure_reason(room), lang.failure_reason(room)
            assert took < cfg.peer_timeout + 5
            assert lang.allocator.free_blocks == 16
            assert not [r for r in caplog.records if "monitor iteration failed" in r.getMessage()]


# ---------------------------------------------------------------- row 2
def test_row2_a_stuck_encoder_cannot_keep_the_pool_in_quarantine():
    """An encoder that heartbeats but never answers INIT or ABORT: the aborted
    rooms' blocks wait for its acknowledgement at most the quarantine timeout
    (2 x peer_timeout), then the link is torn down and the blocks freed; a
    request to an honest encoder, waiting for those blocks, then succeeds."""
    cfg = make_config("shm", pool_blocks=16, default_allocate_tokens=1024, peer_timeout=2.0, request_timeout=30.0)
    data = SyntheticData(HIDDEN, "bf16", 4000, seed=2)
    honest_cfg = cfg.replace(encoder_endpoint=make_config("shm").encoder_endpoint)
    with EncoderEndpoint(cfg) as stuck, EncoderEndpoint(honest_cfg) as honest, \
            LanguageEndpoint(cfg, connect=False) as lang:
        stuck._handle = lambda peer, msg: None          # alive (heartbeats), deaf to INIT and ABORT
        for room in (1, 2):
            lang.request(room, encoder=stuck.address)
        assert wait_until(lambda: lang.poll(1) is Status.WaitingForInput and lang.poll(2) is Status.WaitingForInput)
        assert lang.allocator.free_blocks == 0
        for room in (1, 2):
            lang.abort(room, "the scheduler gave up")
        lang.request(3, encoder=honest.address)            # waits for the quarantined blocks
        honest.send_tensors(3, *data.sample(3, 900))
        assert lang.wait(3, 15) is Status.Success, (lang.poll(3).name, lang.failure_reason(3))
        assert data.verify(3, lang.result(3))
        assert lang.stats["stuck_encoders"] >= 1
        assert wait_until(lambda: lang.allocator.free_blocks == 16, 5)


# ---------------------------------------------------------------- row 3
def test_row3_a_rank_whose_ring_looks_full_does_not_stop_heartbeats_to_others():
    """A same-host rank makes the encoder's ring to it look full forever.  The
    encoder's monitor never blocks on it: an honest rank keeps getting
    heartbeats (it would declare the encoder lost after peer_timeout), its
    room is delivered, and the stuck rank is torn down after peer_timeout."""
    cfg = make_config("shm", peer_timeout=2.0, heartbeat_interval=0.1)
    data = SyntheticData(HIDDEN, "bf16", 4000, seed=3)
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as lang:
        raw = RawRank(enc, cfg, "raw-full", read=False)
        try:
            raw.make_ring_look_full()
            lang.request(7)
            time.sleep(3 * cfg.peer_timeout)             # several heartbeat rounds with the ring full
            enc.send_tensors(7, *data.sample(7, 1500))
            assert lang.wait(7, 10) is Status.Success, lang.failure_reason(7)
            assert data.verify(7, lang.result(7))
            assert lang.stats["reconnects"] == 0 and lang._encoder().connections == 1
            assert wait_until(lambda: "raw-full" not in [p["session_id"] for p in enc.peers()], 5)
            assert enc.stats["stalled_links"] >= 1
        finally:
            raw.close()


# ---------------------------------------------------------------- row 4
def test_row4_an_encoder_that_stops_reading_never_blocks_request():
    """An encoder whose ring reader is stuck: requests to it fill the ring;
    ``request()`` still returns at once (it never waits for ring space under
    the endpoint's lock), another encoder's rooms are served meanwhile, and the
    stuck link is torn down after peer_timeout (its rooms fail, blocks back)."""
    cfg = make_config("shm", pool_blocks=256, default_allocate_tokens=128, ring_bytes=4096, peer_timeout=2.0,
                      heartbeat_interval=0.1)
    data = SyntheticData(HIDDEN, "bf16", 4000, seed=4)
    honest_cfg = cfg.replace(encoder_endpoint=make_config("shm").encoder_endpoint)
    release = threading.Event()
    with EncoderEndpoint(cfg) as stuck, EncoderEndpoint(honest_cfg) as honest:
        try:
            with LanguageEndpoint(cfg, connect=False) as lang:
                lang.connect(stuck.address)
                lang.connect(honest.address)
                stuck._on_message = lambda peer, msg: release.wait(30)     # its reader stops reading
                slowest = 0.0
                for room in range(200):                    # ~40 INITs fill a 4 KiB ring
                    t0 = time.monotonic()
                    lang.request(room, encoder=stuck.address)
                    slowest = max(slowest, time.monotonic() - t0)
                assert slowest < 1.0, f"request() blocked {slowest:.2f}s on a stuck encoder"
                lang.request("honest", encoder=honest.address)
                honest.send_tensors("honest", *data.sample(5, 700))
                assert lang.wait("honest", 10) is Status.Success, lang.failure_reason("honest")
                lang.result("honest")
                for room in range(200):
                    assert lang.wait(room, 10) is Status.Failed
                # torn down by us (its ring made no room) or by it (our heartbeats never reached it)
                assert "encoder lost" in lang.failure_reason(0), lang.failure_reason(0)
                assert wait_until(lambda: lang.allocator.free_blocks == 256, 5)
        finally:
            release.set()


# ---------------------------------------------------------------- row 5
def test_row5_live_rooms_and_blocks_per_session_are_bounded():
    """A rank INITs 3000 new rooms of 64 blocks each (its whole pool every
    time): the encoder keeps at most the session's bound (the blocks a rank's
    pool has: one such room); every other INIT is refused to that rank alone
    (STATUS Failed), and an honest rank is served meanwhile."""
    from embresume import encoder as E
    cfg = make_config("shm", pool_blocks=64)
    data = SyntheticData(HIDDEN, "bf16", 4000, seed=5)
    n = 3000
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as lang:
        raw = RawRank(enc, cfg, "raw-many")
        try:
            for i in range(n):
                raw.send(_init("raw-many", f"flood-{i}", range(64), nonce=i + 1))
            assert wait_until(lambda: len(raw.failed()) >= n - 1, 20), len(raw.failed())
            mine = [r for r in enc._rooms.values() if "raw-many" in r.ranks]
            assert len(mine) <= 1
            assert enc.stats["refused_bound"] >= n - 1
            assert E.MAX_LIVE_BLOCKS_PER_SESSION >= 64
            lang.request("ok")
            enc.send_tensors("ok", *data.sample(1, 2000))
            assert lang.wait("ok", 10) is Status.Success, lang.failure_reason("ok")
            assert data.verify(1, lang.result("ok"))
        finally:
            raw.close()


# ---------------------------------------------------------------- row 6
def test_row6_refusals_of_keyless_tcp_hellos_are_bounded():
    """A peer floods a keyless encoder's tcp port with hellos and never reads:
    at most REFUSAL_BURST + REFUSAL_RATE/s refusals are queued, the others are
    dropped (counted), and the encoder still serves a same-host rank."""
    import zmq
    from embresume import encoder as E
    cfg = make_config("shm")
    data = SyntheticData(HIDDEN, "bf16", 4000, seed=6)
    ctx = zmq.Context.instance()
    n = 5000
    with EncoderEndpoint(cfg) as enc:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 0)
        try:
            s.connect(enc.address)
            hello = P.encode(P.Register(P.Role.LANGUAGE, "flood", "n", 1, 0, "",
                                        {"phase": "hello", "layout": layout_dict(cfg), "offer": ["shm"]}))
            t0 = time.monotonic()
            for _ in range(n):
                s.send(hello)
            assert wait_until(lambda: enc.stats["refusals_sent"] + enc.stats["refusals_dropped"] >= n, 20), \
                dict(enc.stats)
            took = time.monotonic() - t0
            assert enc.stats["refusals_sent"] <= E.REFUSAL_BURST + E.REFUSAL_RATE * (took + 1)
            assert enc.stats["refusals_dropped"] > 0
        finally:
            s.close()
        with LanguageEndpoint(cfg) as lang:
            enc.send_tensors(1, *data.sample(1, 500))
            assert data.verify(1, lang.recv(1, timeout=10))


# ---------------------------------------------------------------- row 7
def test_row7_a_heartbeat_flood_disconnects_the_flooder():
    """A rank writes valid heartbeats into its ring as fast as it can: past the
    no-op frame bound it is disconnected (its reader stops burning a core), and
    an honest rank is served."""
    cfg = make_config("shm")
    data = SyntheticData(HIDDEN, "bf16", 4000, seed=7)
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as lang:
        raw = RawRank(enc, cfg, "raw-hb")
        try:
            hb = P.encode(P.Heartbeat(1, 1))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and "raw-hb" in [p["session_id"] for p in enc.peers()]:
                try:
                    for _ in range(500):
                        raw.l2e.send(hb, timeout=0.5)
                except Exception:
                    break
            assert "raw-hb" not in [p["session_id"] for p in enc.peers()]
            assert enc.stats["noop_flood"] >= 1
            enc.send_tensors(1, *data.sample(1, 1500))
            assert data.verify(1, lang.recv(1, timeout=10))
        finally:
            raw.close()


def test_row7_an_encoder_flooding_heartbeats_is_disconnected_by_the_rank():
    """The same bound on the language side: an encoder writing heartbeats into
    a rank's ring as fast as it can is disconnected; the next request to it
    reconnects and is served."""
    cfg = make_config("shm")
    data = SyntheticData(HIDDEN, "bf16", 4000, seed=17)
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as lang:
        enc.wait_peers(1, 10)
        peer = next(iter(enc._peers.values()))
        hb = P.encode(P.Heartbeat(1, 1))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and lang._encoder().connections == 1 and lang.connected:
            try:
                for _ in range(500):
                    peer.channel.send_bytes(hb)
            except Exception:
                break
            time.sleep(0)
        assert wait_until(lambda: lang.stats["noop_flood"] >= 1, 5), dict(lang.stats)
        enc.send_tensors(2, *data.sample(2, 900))
        assert data.verify(2, lang.recv(2, timeout=15))


# ---------------------------------------------------------------- row 8
@pytest.mark.parametrize("intruder_required", [3, 2])
def test_row8_another_tp_group_cannot_fail_or_join_a_gathering_room(intruder_required):
    """Ranks 0 and 1 of one TP group (required_dst_info_num=2); between their
    INITs a session of another group INITs the room, with another rank count
    (3) or as the missing rank (2).  It alone is refused; both real ranks get
    the data."""
    cfg = make_config("shm")
    data = SyntheticData(HIDDEN, "bf16", 4000, seed=8)
    group = cfg.replace(extra={"tp_group": "engine-A"})
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(group, tp_rank=0) as r0, \
            LanguageEndpoint(group, tp_rank=1) as r1, \
            LanguageEndpoint(cfg.replace(extra={"tp_group": "engine-B"}), tp_rank=1) as intruder:
        r0.request(9, required_dst_info_num=2)
        assert wait_until(lambda: 9 in enc._rooms and len(enc._rooms[9].ranks) == 1)
        intruder.request(9, required_dst_info_num=intruder_required)
        assert intruder.wait(9, 5) is Status.Failed
        assert "TP group" in intruder.failure_reason(9), intruder.failure_reason(9)
        r1.request(9, required_dst_info_num=2)
        enc.send_tensors(9, *data.sample(9, 1500))
        for r in (r0, r1):
            assert r.wait(9, 10) is Status.Success, r.failure_reason(9)
            assert data.verify(9, r.result(9))
        assert wait_until(lambda: intruder.allocator.free_blocks == intruder.layout.num_blocks, 5)


# ---------------------------------------------------------------- row 9
def test_row9_a_pool_sealed_with_shrink_only_is_refused():
    cfg = make_config("shm")
    layout = layout_dict(cfg)
    nbytes = BlockLayout.from_dict(layout).nbytes
    with EncoderEndpoint(cfg) as enc:
        sock = unix.connect(enc.unix_name, 5.0)
        rings = [ShmRing.create(4096), ShmRing.create(4096)]
        fd = os.memfd_create("embresume-pool", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, nbytes)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)      # may still grow and be resealed
            hello = {"phase": "hello", "layout": layout, "offer": ["shm"]}
            unix.send(sock, P.encode(P.Register(P.Role.LANGUAGE, "s", "n", os.getpid(), 0, "", hello)))
            data, got = unix.recv_blocking(sock, time.monotonic() + 5)
            unix.close_all(got)
            desc, fds = unix.pack_fds({"phase": "pool",
                                       "pool": {"fd": unix.Fd(fd), "nbytes": nbytes, "layout": layout},
                                       "rings": {"l2e": [unix.Fd(x) for x in rings[0].handles()],
                                                 "e2l": [unix.Fd(x) for x in rings[1].handles()]}})
            unix.send(sock, P.encode(P.Register(P.Role.LANGUAGE, "s", "n", os.getpid(), 0, "shm", desc)), fds)
            data, got = unix.recv_blocking(sock, time.monotonic() + 5)
            unix.close_all(got)
            bye = P.decode(data)
            assert isinstance(bye, P.Bye), bye
            assert "not sealed" in bye.reason and "growing" in bye.reason, bye.reason
            assert enc.peers() == []
        finally:
            sock.close()
            os.close(fd)
            for r in rings:
                r.close()


# ---------------------------------------------------------------- an encoder's share of the pool
def test_an_encoders_share_of_the_pool_can_be_capped():
    """With extra['max_encoder_share'] = 0.5, a stuck encoder's requests and
    quarantine hold at most half of the pool: requests to an honest encoder are
    served at once meanwhile, and the stuck encoder's requests wait for its own
    share, not in front of the others."""
    cfg = make_config("shm", pool_blocks=16, default_allocate_tokens=512, peer_timeout=30.0, request_timeout=60.0,
                      heartbeat_interval=0.5, extra={"max_encoder_share": 0.5})
    data = SyntheticData(HIDDEN, "bf16", 4000, seed=10)
    honest_cfg = cfg.replace(encoder_endpoint=make_config("shm").encoder_endpoint)
    with EncoderEndpoint(cfg) as stuck, EncoderEndpoint(honest_cfg) as honest, \
            LanguageEndpoint(cfg, connect=False) as lang:
        stuck._handle = lambda peer, msg: None          # alive, never answers
        for room in range(6):                            # 4 blocks each: two fit its share
            lang.request(room, encoder=stuck.address)
        assert wait_until(lambda: sum(lang.poll(r) is Status.WaitingForInput for r in range(6)) == 2)
        lang.abort(0, "gave up")                         # its blocks are quarantined: still its share
        assert lang.allocator.free_blocks == 8
        for i, room in enumerate(("h1", "h2", "h3")):
            lang.request(room, encoder=honest.address)
            honest.send_tensors(room, *data.sample(20 + i, 300 + 200 * i))
            assert lang.wait(room, 10) is Status.Success, lang.failure_reason(room)
            assert data.verify(20 + i, lang.result(room))
        assert [lang.poll(r) for r in range(1, 6)].count(Status.Bootstrapping) == 4
        with pytest.raises(ValueError, match="max_encoder_share"):
            LanguageEndpoint(cfg.replace(extra={"max_encoder_share": 1.5}), connect=False)


def test_row4_over_zeromq_the_queue_to_a_peer_that_does_not_read_is_bounded():
    """Across hosts the control channel is ZeroMQ: frames to a peer that does
    not read queue up to SND_HWM (plus what the kernel's socket buffers hold),
    then the send fails and on_send_error is told (the endpoints drop that
    peer: the rank's link is lost, the encoder's peer is dropped)."""
    import zmq
    from embresume.channel import SND_HWM, ZmqHub
    from embresume.harness import free_port
    ctx = zmq.Context.instance()
    deaf = ctx.socket(zmq.ROUTER)
    deaf.setsockopt(zmq.LINGER, 0)
    deaf.setsockopt(zmq.RCVHWM, 10)
    port = free_port()
    deaf.bind(f"tcp://127.0.0.1:{port}")
    errors = []
    hub = ZmqHub(zmq.DEALER, connect=f"tcp://127.0.0.1:{port}", on_frames=lambda i, d: None, name="t",
                 on_send_error=lambda ident, e: errors.append(e))
    try:
        frame = b"x" * 4096
        for _ in range(4 * SND_HWM):                 # 160 MiB would be queued without the bound
            hub.send(b"", frame)
            if errors:
                break
        assert wait_until(lambda: bool(errors), 10)
    finally:
        hub.close()
        deaf.close()


def test_hub_closed_by_its_own_frame_handler():
    """A frame handler that closes its hub (an endpoint closed on a peer's message) ends the
    hub's thread cleanly: its sockets closed by that thread once the handler returns, no
    exception in it, the frames queued behind left unread.  Before: close() closed the
    sockets under the running thread, whose next receive failed with ENOTSOCK ("Socket
    operation on non-socket") as an unhandled exception in the thread."""
    import threading

    import zmq
    from embresume.channel import ZmqHub
    from embresume.harness import free_port
    ctx = zmq.Context.instance()
    peer = ctx.socket(zmq.ROUTER)
    peer.setsockopt(zmq.LINGER, 0)
    port = free_port()
    peer.bind(f"tcp://127.0.0.1:{port}")
    seen, failures = [], []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: failures.append(args.exc_value)
    hub = None

    def on_frames(ident, data):
        seen.append(data)
        hub.close()

    try:
        hub = ZmqHub(zmq.DEALER, connect=f"tcp://127.0.0.1:{port}", on_frames=on_frames, name="t")
        hub.send(b"", b"hello")
        assert peer.poll(5000), "the hub never connected"
        ident, _ = peer.recv_multipart()
        for i in range(5):
            peer.send_multipart([ident, b"frame %d" % i])
        hub._thread.join(5)
        assert not hub._thread.is_alive()
        assert seen == [b"frame 0"]
        assert hub.sock.closed and hub._pull.closed and hub._push.closed
        assert failures == []
    finally:
        threading.excepthook = old_hook
        if hub is not None:
            hub.close()
        peer.close()


# ---------------------------------------------------------------- sessions per encoder
def test_sessions_per_encoder_are_bounded(monkeypatch):
    """An encoder serves at most MAX_SESSIONS language sessions at once: one past it is
    refused at its hello (a clear error on that rank), and the sessions it has keep
    being served."""
    import embresume.encoder as encoder_mod

    monkeypatch.setattr(encoder_mod, "MAX_SESSIONS", 1)
    cfg = make_config("shm")
    data = SyntheticData(HIDDEN, "bf16", 4000, seed=11)
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as first:
        with pytest.raises(PeerError, match="sessions"):
            LanguageEndpoint(cfg, tp_rank=1)
        assert enc.stats["refused_sessions"] >= 1 and len(enc.peers()) == 1
        first.request(5)
        enc.send_tensors(5, *data.sample(5, 700))
        assert first.wait(5, 10) is Status.Success, first.failure_reason(5)
        assert data.verify(5, first.result(5))
