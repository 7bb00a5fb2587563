"""Bad input, timeouts and peer death: one request fails, the rest keep going."""

import itertools
import threading
import time

import pytest

from embresume import protocol as P
from embresume.encoder import EncoderEndpoint
from embresume.harness import EncoderProcess, LanguageProcess
from embresume.language import LanguageEndpoint
from embresume.status import Status
from embresume.synthetic import SyntheticData

from conftest import device_of, make_config

HIDDEN = 128
_rooms = itertools.count(5000)


@pytest.fixture
def pair(transport):
    cfg = make_config(transport, hidden_size=HIDDEN, pool_blocks=16)
    data = SyntheticData(HIDDEN, "bf16", 300000, seed=1)
    with EncoderProcess(cfg, data_spec=(HIDDEN, "bf16", 300000, 1, device_of(transport))) as enc, LanguageEndpoint(cfg) as lang:
        yield cfg, enc, lang, data


def incoming(lang):
    """Record every STATUS the language rank receives."""
    seen = []
    orig = lang.channel.on_message

    def on_message(ch, msg):
        if isinstance(msg, P.StatusMsg):
            seen.append(msg)
        return orig(ch, msg)

    lang.channel.on_message = on_message
    return seen


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


def ok_roundtrip(lang, enc, data, tokens=3000):
    room = next(_rooms)
    lang.request(room)
    enc.send(room, tokens)
    assert lang.wait(room, 30) is Status.Success, lang.failure_reason(room)
    assert data.verify(room, lang.result(room))


def test_garbage_frames_are_dropped_and_service_continues(pair):
    cfg, enc, lang, data = pair
    for junk in (b"", b"EMBR", b"x" * 100, P.encode(P.Abort(1, "x"))[:-1]):
        lang.channel.send_bytes(junk)
    assert wait_for(lambda: enc.stats()[0].get("bad_messages", 0) >= 3)
    ok_roundtrip(lang, enc, data)
    assert lang.allocator.free_blocks == 16


@pytest.mark.parametrize("bad, reason", [
    (dict(dst_blocks=(0, 10**6)), "dst_blocks"),
    (dict(allocated_tokens=100), "block size mismatch"),
    (dict(session_id="someone-else"), "session_id"),
])
def test_bad_init_fails_that_room_only(pair, bad, reason):
    cfg, enc, lang, data = pair
    seen = incoming(lang)
    room = next(_rooms)
    fields = dict(room=room, endpoint="x", dst_port=0, session_id=lang._encoder().link.session_id, dst_blocks=(0, 1),
                  required_dst_info_num=1, allocated_tokens=256)
    fields.update(bad)
    lang.channel.send(P.Init(**fields))
    assert wait_for(lambda: any(m.room == room for m in seen))
    m = next(m for m in seen if m.room == room)
    assert m.status is Status.Failed and reason in m.reason
    ok_roundtrip(lang, enc, data)


def test_resume_with_wrong_sent_tokens_fails_the_room(pair):
    cfg, enc, lang, data = pair
    seen = incoming(lang)
    room = next(_rooms)
    # a resume before any chunk was sent (the encoder has no embedding for the room yet)
    lang.request(room)
    lang.channel.send(P.Resume(room, "x", 0, lang._encoder().link.session_id, (15,), 1, 128, sent_tokens=999 * 128))
    assert lang.wait(room, 10) is Status.Failed
    assert "resume" in lang.failure_reason(room)
    assert wait_for(lambda: lang.allocator.free_blocks == 16)
    ok_roundtrip(lang, enc, data)


def test_request_timeout_quarantines_then_releases_blocks(transport):
    cfg = make_config(transport, hidden_size=HIDDEN, pool_blocks=16, request_timeout=1.0)
    with EncoderProcess(cfg, data_spec=(HIDDEN, "bf16", 10000, 1, device_of(transport))) as enc, LanguageEndpoint(cfg) as lang:
        room = next(_rooms)
        t0 = time.monotonic()
        lang.request(room)                  # the encoder never gets the embedding
        assert lang.wait(room, 10) is Status.Failed
        assert time.monotonic() - t0 < 5
        assert "timed out" in lang.failure_reason(room)
        # the encoder confirms the abort; only then the blocks are reusable
        assert wait_for(lambda: lang.allocator.free_blocks == 16, 5)
        room2 = next(_rooms)
        lang.request(room2)
        enc.send(room2, 100)
        assert lang.wait(room2, 10) is Status.Success


def test_full_pool_requests_wait_then_complete(pair):
    cfg, enc, lang, data = pair
    rooms = [next(_rooms) for _ in range(6)]
    for r in rooms:
        lang.request(r)                     # 16 blocks, 8 per default allocation: 2 fit
    assert [lang.poll(r) for r in rooms].count(Status.Bootstrapping) == 4
    for r in rooms:
        enc.send(r, 2100)
    for r in rooms:
        assert lang.wait(r, 30) is Status.Success, lang.failure_reason(r)
        assert data.verify(r, lang.result(r))
    assert lang.allocator.free_blocks == 16


def test_encoder_death_mid_resume(transport):
    cfg = make_config(transport, hidden_size=HIDDEN, block_size=8, pool_blocks=1, default_allocate_tokens=8,
                      peer_timeout=1.5, heartbeat_interval=0.1)
    enc = EncoderProcess(cfg, data_spec=(HIDDEN, "bf16", 300000, 1, device_of(transport)))
    try:
        with LanguageEndpoint(cfg) as lang:
            room = next(_rooms)
            lang.request(room)
            enc.send(room, 200000)           # 25000 chunks: long enough to kill it midway
            assert wait_for(lambda: lang.poll(room) is Status.Transferring, 20)
            enc.kill()
            t0 = time.monotonic()
            assert lang.wait(room, 10) is Status.Failed
            assert time.monotonic() - t0 < cfg.peer_timeout + 2
            assert "encoder lost" in lang.failure_reason(room)
            assert lang.allocator.free_blocks == 1
            assert not lang.connected
            with pytest.raises(Exception):
                lang.result(room)
            room2 = next(_rooms)
            lang.request(room2)                  # reconnects off the caller's thread ...
            t0 = time.monotonic()
            assert lang.wait(room2, 5) is Status.Failed   # ... and fails fast, no hang
            assert time.monotonic() - t0 < 3 and "cannot connect" in lang.failure_reason(room2)
    finally:
        enc.close()


def test_language_death_mid_resume(transport):
    cfg = make_config(transport, hidden_size=HIDDEN, block_size=8, pool_blocks=1, default_allocate_tokens=8,
                      peer_timeout=1.5, heartbeat_interval=0.1)
    data = SyntheticData(HIDDEN, "bf16", 300000, seed=1)
    done = {}
    ev = threading.Event()
    with EncoderEndpoint(cfg) as enc:
        room = next(_rooms)
        with LanguageProcess(cfg, room) as lp:
            e, f, m, d = data.sample(room, 200000)
            enc.send_tensors(room, e, f, m, d, on_done=lambda r, st: (done.update({r: st}), ev.set()))
            kind, status, _ = lp.wait_report(30)
            assert (kind, status) == ("status", "Transferring")
            lp.kill()
            t0 = time.monotonic()
            assert ev.wait(cfg.peer_timeout + 3), "encoder did not notice the dead language rank"
            assert done[room] is Status.Failed
            assert time.monotonic() - t0 < cfg.peer_timeout + 3
            assert enc.poll(room) is Status.Failed
            assert wait_for(lambda: enc.peers() == [], 5)
        # the encoder keeps serving a new rank
        with LanguageEndpoint(cfg) as lang:
            room2 = next(_rooms)
            e, f, m, d = data.sample(room2, 50)
            enc.send_tensors(room2, e, f, m, d)
            assert data.verify(room2, lang.recv(room2, timeout=10))


def test_failed_write_holds_blocks_until_teardown(monkeypatch):
    """A write that failed may still land later (timed-out RDMA): its blocks are
    not reused while the connection lives, and are freed when it is torn down."""
    from embresume.errors import TransferError
    from embresume.transport.shm import ShmTransport

    cfg = make_config("shm", hidden_size=HIDDEN, pool_blocks=16)
    data = SyntheticData(HIDDEN, "bf16", 5000, seed=1)
    bad_room = next(_rooms)
    real = ShmTransport.write_chunk

    def flaky(self, peer, src, plan, aux):
        if src.total_tokens == 1111:
            raise TransferError("simulated timed-out write")
        return real(self, peer, src, plan, aux)

    monkeypatch.setattr(ShmTransport, "write_chunk", flaky)
    with EncoderEndpoint(cfg) as enc:
        lang = LanguageEndpoint(cfg)
        try:
            lang.request(bad_room)
            e, f, m, d = data.sample(bad_room, 1111)
            enc.send_tensors(bad_room, e, f, m, d)
            assert lang.wait(bad_room, 10) is Status.Failed
            assert "simulated timed-out write" in lang.failure_reason(bad_room)
            assert lang.allocator.free_blocks == 8          # its 8 blocks are held
            room = next(_rooms)                              # others are still served
            e, f, m, d = data.sample(room, 900)
            enc.send_tensors(room, e, f, m, d)
            assert data.verify(room, lang.recv(room, timeout=10))
            assert lang.allocator.free_blocks == 8
        finally:
            lang.close()
        assert lang.allocator.free_blocks == 16              # torn down: released


def _inproc(**kw):
    cfg = make_config("shm", hidden_size=HIDDEN, **kw)
    return cfg, SyntheticData(HIDDEN, "bf16", 8000, seed=1)


def _send(enc, data, room, tokens):
    e, f, m, d = data.sample(room, tokens)
    enc.send_tensors(room, e, f, m, d)


def test_abort_of_a_waiting_request_blocks_retries_until_acknowledged():
    """An aborted room stays quarantined until the encoder's acknowledgement,
    even without blocks; a late acknowledgement never fails a newer attempt."""
    cfg, data = _inproc(pool_blocks=8, default_allocate_tokens=1024)
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as lang:
        hold = next(_rooms)
        lang.request(hold)                      # takes the whole pool, no embedding yet
        room = next(_rooms)
        lang.request(room)                      # waits for blocks
        assert lang.poll(room) is Status.Bootstrapping
        with lang._lock:                        # the acknowledgement cannot be processed yet
            lang.abort(room, "user gave up")
            with pytest.raises(ValueError, match="abort"):
                lang.request(room)
        assert wait_for(lambda: room not in lang._encoder().quarantine, 5)
        lang.request(room)                      # the retry is now allowed ...
        _send(enc, data, hold, 500)
        _send(enc, data, room, 700)
        assert lang.wait(room, 10) is Status.Success     # ... and not failed by the old ack
        assert data.verify(room, lang.result(room))
        lang.result(hold).release()
        assert lang.allocator.free_blocks == 8


def test_recv_after_the_result_arrived_and_uncollected_results():
    cfg, data = _inproc(pool_blocks=16, zero_copy=True)
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as lang:
        room = next(_rooms)
        lang.request(room)
        _send(enc, data, room, 900)
        assert lang.wait(room, 10) is Status.Success
        with pytest.raises(ValueError, match="collected"):
            lang.request(room)                  # would drop the result (and leak its blocks)
        r = lang.recv(room, timeout=5)          # returns what already arrived
        assert data.verify(room, r)
        r.release()
        assert lang.allocator.free_blocks == 16


def test_zero_copy_result_outlives_the_endpoint():
    cfg, data = _inproc(pool_blocks=16, zero_copy=True)
    with EncoderEndpoint(cfg) as enc:
        with LanguageEndpoint(cfg) as lang:
            room = next(_rooms)
            lang.request(room)
            _send(enc, data, room, 1000)
            r = lang.recv(room, timeout=10)
            assert lang.stats["zero_copy"] == 1
        # the endpoint is closed: the views must still be readable (no unmapped memory)
        assert data.verify(room, r)
        r.release()


@pytest.mark.parametrize("seed, pool0, pool1", [(1, 2, 3), (2, 3, 5), (3, 3, 5)])
def test_tp_ranks_under_pool_pressure_do_not_deadlock(seed, pool0, pool1):
    """Two ranks with small, different pools and many multi-chunk rooms requested
    in the same order: a resume never queues behind new requests (it would let
    the ranks wait on each other through the encoder's all-ranks gate)."""
    import random
    rng = random.Random(seed)
    cfg, data = _inproc(pool_blocks=8, default_allocate_tokens=256, pipeline_bytes=0, request_timeout=20.0)
    rooms = [next(_rooms) for _ in range(24)]
    sizes = [rng.randint(100, 3000) for _ in rooms]
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg.replace(pool_blocks=pool0), tp_rank=0) as r0, \
            LanguageEndpoint(cfg.replace(pool_blocks=pool1), tp_rank=1) as r1:
        def go(lang):
            for room in rooms:
                lang.request(room, required_dst_info_num=2)
                time.sleep(rng.random() * 0.002)
        threads = [threading.Thread(target=go, args=(x,)) for x in (r0, r1)]
        for t in threads:
            t.start()
        for room, n in zip(rooms, sizes):
            _send(enc, data, room, n)
        for t in threads:
            t.join(10)
        for lang in (r0, r1):
            for room, n in zip(rooms, sizes):
                assert lang.wait(room, 20) is Status.Success, lang.failure_reason(room)
                res = lang.result(room)
                assert res.total_tokens == n and data.verify(room, res)
        assert r0.allocator.free_blocks == pool0 and r1.allocator.free_blocks == pool1


def test_small_first_chunk_is_written_by_the_sending_thread_big_one_by_the_worker():
    """Request first, then ``send_tensors``: a first chunk of at most
    INLINE_WRITE_BYTES to a same-host rank is written by the calling thread
    (no hand-off), a bigger one by the peer's worker; both arrive bit-exact."""
    from embresume import encoder as E
    cfg, data = _inproc(pool_blocks=64, default_allocate_tokens=4096)
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as lang:
        small = E.INLINE_WRITE_BYTES // (HIDDEN * 2)           # tokens that fit the inline limit
        big = small + 1
        seen = []
        enc.wait_peers(1, 10)
        peer = next(iter(enc._peers.values()))
        orig = peer.transport.write_chunk

        def write_chunk(*a, **k):
            seen.append(threading.current_thread())
            return orig(*a, **k)

        peer.transport.write_chunk = write_chunk
        for tokens in (small, big):
            room = next(_rooms)
            lang.request(room)
            assert wait_for(lambda: room in enc._rooms and enc._rooms[room].ranks, 5)   # the INIT is here
            _send(enc, data, room, tokens)
            assert lang.wait(room, 20) is Status.Success
            r = lang.result(room)
            assert data.verify(room, r)
            r.release()
        assert seen[0] is threading.current_thread()
        assert seen[1] is not threading.current_thread() and seen[1].name.startswith("embresume-enc-")


def test_send_tensors_checks_its_arguments_at_the_call():
    """A numpy array, a 1-D or 3-D tensor, another dtype or width than the
    Config's, and fill_ids / mrope_positions of the wrong shape or dtype all
    raise InvalidArgument at the call, naming what is wrong; nothing is
    registered, and a correct call afterwards is delivered."""
    import numpy as np
    import torch
    from embresume.errors import InvalidArgument
    cfg, data = _inproc(pool_blocks=16)
    e, f, m, d = data.sample(1, 100)
    cases = [
        ((e.float().numpy(), f, m), "torch.Tensor"),
        ((e, f.numpy(), m), "fill_ids must be a torch.Tensor"),
        ((e[0], f, m), r"embeddings must be \[T, hidden\]"),
        ((e.unsqueeze(0), f, m), r"embeddings must be \[T, hidden\]"),
        ((e.to(torch.float16), f, m), "dtype"),
        ((torch.zeros(100, HIDDEN * 2, dtype=e.dtype), f, m), "hidden_size"),
        ((e, f[:50], m), "fill_ids"),
        ((e, f.to(torch.int64), m), "fill_ids"),
        ((e, f, m[:2]), "mrope_positions"),
        ((e, f, m.T.contiguous()), "mrope_positions"),
        ((e, f, np.zeros((3, 100), np.int32)), "numpy"),
    ]
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as lang:
        for args, words in cases:
            with pytest.raises(InvalidArgument, match=words):
                enc.send_tensors(1, *args, d)
        assert not enc._rooms
        enc.send_tensors(1, e, f, m, d)
        assert data.verify(1, lang.recv(1, timeout=10))


def test_encoder_close_is_not_reported_as_a_lost_peer(caplog):
    """The encoder's Bye makes the language rank hang up at once; when that
    hang-up is seen before the encoder has dropped the peer itself, it is the
    goodbye the encoder asked for, not an error (a Ctrl-C of the demo printed
    "language rank 0 (...) gone: control channel closed" beside its one line)."""
    import logging
    cfg, data = _inproc(pool_blocks=16)
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as lang:
        _send(enc, data, 1, 100)
        assert data.verify(1, lang.recv(1, timeout=10))
        (peer,) = enc._peers.values()
        real_send = peer.channel.send

        def send_then_wait(msg):
            real_send(msg)
            if isinstance(msg, P.Bye):   # the peer hangs up before close() drops it
                deadline = time.monotonic() + 5
                while peer.alive and time.monotonic() < deadline:
                    time.sleep(0.01)

        peer.channel.send = send_then_wait
        with caplog.at_level(logging.INFO, logger="embresume"):
            enc.close()
        gone = [r for r in caplog.records if "gone" in r.getMessage()]
        assert gone, "the language rank did not hang up on the Bye"
        assert all(r.levelno == logging.INFO for r in gone), [(r.levelname, r.getMessage()) for r in gone]
