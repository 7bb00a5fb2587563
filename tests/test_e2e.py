"""Two-process end-to-end scenarios, run against every transport.

The encoder lives in a spawned child (embresume.harness.EncoderProcess) and
serves deterministic synthetic data; the language rank(s) run here and verify
every merged result bit for bit.
"""

import itertools
import threading
import time

import pytest

from embresume import protocol as P
from embresume.harness import EncoderProcess
from embresume.language import LanguageEndpoint
from embresume.status import Status
from embresume.synthetic import SyntheticData

from conftest import device_of, make_config

HIDDEN = 256
MAX_TOKENS = 20000
_rooms = itertools.count(1000)


@pytest.fixture(scope="module")
def data():
    return SyntheticData(HIDDEN, "bf16", MAX_TOKENS, seed=5)


@pytest.fixture
def encoder(transport):
    cfg = make_config(transport)
    with EncoderProcess(cfg, data_spec=(HIDDEN, "bf16", MAX_TOKENS, 5, device_of(transport))) as enc:
        yield cfg, enc


def spy(lang):
    """Record every INIT/RESUME the language rank sends."""
    sent = []
    orig = lang.channel.send

    def send(msg):
        if isinstance(msg, (P.Init, P.Resume)):
            sent.append(msg)
        return orig(msg)

    lang.channel.send = send
    return sent


def check_clean(lang):
    assert lang.allocator.free_blocks == lang.layout.num_blocks, "blocks not returned to the allocator"
    assert lang.allocator.rooms() == []


def run_one(lang, enc, data, tokens, timeout=30):
    room = next(_rooms)
    lang.request(room)
    enc.send(room, tokens)
    st = lang.wait(room, timeout)
    assert st is Status.Success, f"{st.name}: {lang.failure_reason(room)}"
    hist = lang.history(room)
    r = lang.result(room)
    assert r.total_tokens == tokens
    assert data.verify(room, r), "merged result differs from what the encoder sent"
    return r, hist


@pytest.mark.parametrize("tokens, chunks", [(1, 1), (100, 1), (700, 1), (1024, 1), (2000, 2), (5000, 5),
                                            (10000, 10)])
def test_sizes(encoder, data, tokens, chunks):
    cfg, enc = encoder
    with LanguageEndpoint(cfg.replace(pool_blocks=8)) as lang:   # 8 blocks = 1024 tokens per grant
        assert lang.transport_name == cfg.transport
        r, hist = run_one(lang, enc, data, tokens)
        assert r.chunks == chunks
        expected = [Status.Bootstrapping, Status.WaitingForInput] + [Status.Transferring] * (chunks - 1) + [
            Status.Success]
        assert hist == expected
        check_clean(lang)


def test_exactly_the_allocation(encoder, data):
    cfg, enc = encoder
    with LanguageEndpoint(cfg.replace(default_allocate_tokens=4096, pool_blocks=64)) as lang:
        r, hist = run_one(lang, enc, data, 4096)
        assert r.chunks == 1 and Status.Transferring not in hist
        r, hist = run_one(lang, enc, data, 4097)
        assert r.chunks == 2 and hist.count(Status.Transferring) == 1
        check_clean(lang)


def test_tiny_allocation_forces_many_resumes(encoder, data):
    cfg, enc = encoder
    with LanguageEndpoint(cfg.replace(pool_blocks=2)) as lang:
        sent = spy(lang)
        r, hist = run_one(lang, enc, data, 3000)
        assert r.chunks == 12 and hist.count(Status.Transferring) == 11
        assert [type(m) for m in sent] == [P.Init] + [P.Resume] * 11
        assert [m.sent_tokens for m in sent[1:]] == [256 * i for i in range(1, 12)]
        check_clean(lang)


def test_reference_example(encoder, data):
    """2000 tokens; the pool grants only 8 blocks (1024 of the 8192 asked)."""
    cfg, enc = encoder
    with LanguageEndpoint(cfg.replace(default_allocate_tokens=8192, pool_blocks=8)) as lang:
        sent = spy(lang)
        r, hist = run_one(lang, enc, data, 2000)
        assert hist == [Status.Bootstrapping, Status.WaitingForInput, Status.Transferring, Status.Success]
        init, resume = sent
        assert isinstance(init, P.Init) and init.allocated_tokens == 1024 and len(init.dst_blocks) == 8
        assert isinstance(resume, P.Resume)
        assert (resume.sent_tokens, resume.allocated_tokens, len(resume.dst_blocks)) == (1024, 1024, 8)
        assert r.chunks == 2 and r.total_tokens == 1024 + 976
        check_clean(lang)


def test_send_before_request(encoder, data):
    cfg, enc = encoder
    with LanguageEndpoint(cfg) as lang:
        room = next(_rooms)
        enc.send(room, 1500)
        time.sleep(0.2)
        r = lang.recv(room, timeout=30)
        assert data.verify(room, r) and r.chunks == 2
        check_clean(lang)


def test_32_concurrent_requests_compete_for_a_small_pool(encoder, data):
    cfg, enc = encoder
    # 32 requests of up to 6000 tokens through a 24-block (3072-token) pool: many wait, none deadlock
    with LanguageEndpoint(cfg.replace(pool_blocks=24, default_allocate_tokens=1024)) as lang:
        sizes = [1 + (i * 997) % 6000 for i in range(32)]
        rooms = [next(_rooms) for _ in sizes]
        for room in rooms:
            lang.request(room)
        enc.send_many(zip(rooms, sizes))
        deadline = time.monotonic() + 60
        for room, tokens in zip(rooms, sizes):
            st = lang.wait(room, max(0.1, deadline - time.monotonic()))
            assert st is Status.Success, f"room {room}: {st.name} {lang.failure_reason(room)}"
            r = lang.result(room)
            assert r.total_tokens == tokens and data.verify(room, r)
        check_clean(lang)


def test_tp_fanout_two_ranks(encoder, data):
    """Every rank gets a full copy; ranks with different pools resume independently."""
    cfg, enc = encoder
    with LanguageEndpoint(cfg.replace(pool_blocks=4), tp_rank=0) as r0, \
            LanguageEndpoint(cfg.replace(pool_blocks=32), tp_rank=1) as r1:
        for tokens in (300, 2500):
            room = next(_rooms)
            r0.request(room, required_dst_info_num=2)
            time.sleep(0.05)   # the encoder must wait for rank 1 before writing anything
            assert r0.poll(room) is Status.WaitingForInput
            enc.send(room, tokens)
            time.sleep(0.05)
            assert r0.poll(room) is Status.WaitingForInput
            r1.request(room, required_dst_info_num=2)
            res = []
            for lang in (r0, r1):
                st = lang.wait(room, 30)
                assert st is Status.Success, lang.failure_reason(room)
                res.append(lang.result(room))
            assert all(data.verify(room, x) for x in res)
            assert res[0].chunks == -(-tokens // 512) and res[1].chunks == (1 if tokens <= 1024 else 2)  # a resume asks for the whole rest
        check_clean(r0)
        check_clean(r1)


def test_duplicate_init_is_ignored(encoder, data):
    cfg, enc = encoder
    with LanguageEndpoint(cfg.replace(pool_blocks=8)) as lang:
        sent = spy(lang)
        r, _ = run_one(lang, enc, data, 2000)
        init = sent[0]
        # replay the INIT after Success: rule 4, the encoder must not write again
        lang.channel.send(init)
        time.sleep(0.3)
        stats, _peers = enc.stats()
        assert stats.get("duplicates", 0) >= 1
        assert stats["chunks"] == 2
        check_clean(lang)


def test_handshake_rejects_layout_mismatch(encoder):
    cfg, enc = encoder
    from embresume.errors import PeerError
    with pytest.raises(PeerError, match="layout mismatch"):
        LanguageEndpoint(cfg.replace(hidden_size=HIDDEN * 2))


def test_pipelined_chunks_report_progress(transport, data):
    """Chunks split into pieces: PROGRESS lets the receiver copy while the rest lands."""
    cfg = make_config(transport, pipeline_bytes=2 * 128 * HIDDEN * 2)   # two blocks per piece
    with EncoderProcess(cfg, data_spec=(HIDDEN, "bf16", MAX_TOKENS, 5, device_of(transport))) as enc, \
            LanguageEndpoint(cfg.replace(pool_blocks=8)) as lang:
        seen = []
        orig = lang.channel.on_message

        def on_message(ch, msg):
            if isinstance(msg, P.Progress):
                seen.append(msg)
            return orig(ch, msg)

        lang.channel.on_message = on_message
        r, hist = run_one(lang, enc, data, 2000)        # chunks of 1024 and 976 tokens
        assert r.chunks == 2 and hist.count(Status.Transferring) == 1
        if lang.transport_name == "shm":                # GPU kernels, Mooncake over tcp: not pipelined
            assert [(m.seq, m.landed) for m in seen] == [(1, 256), (1, 512), (1, 768), (2, 256), (2, 512),
                                                         (2, 768)]
        else:
            assert seen == []
        check_clean(lang)


def test_bad_progress_fails_the_room(encoder, data):
    cfg, enc = encoder
    with LanguageEndpoint(cfg.replace(pool_blocks=8)) as lang:
        room = next(_rooms)
        lang.request(room)
        # a forged progress report beyond the allocation, delivered as if from the encoder
        lang._on_message(lang._encoder(), P.Progress(room, 1, 10**6))
        assert lang.poll(room) is Status.Failed and "bad progress report" in lang.failure_reason(room)
        run_one(lang, enc, data, 1500)
        assert wait_for_free(lang)


def wait_for_free(lang, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lang.allocator.free_blocks == lang.layout.num_blocks:
            return True
        time.sleep(0.01)
    return False


def test_zero_copy_receive(encoder, data):
    """One-chunk requests come back as views of the receive pool; the blocks
    return to the allocator only when the result is released."""
    cfg, enc = encoder
    with LanguageEndpoint(cfg.replace(pool_blocks=16, zero_copy=True)) as lang:
        room = next(_rooms)
        lang.request(room)
        enc.send(room, 1000)
        assert lang.wait(room, 30) is Status.Success
        r = lang.result(room)
        assert data.verify(room, r)
        pool = lang.pool.embeddings
        assert pool.data_ptr() <= r.embeddings.data_ptr() < pool.data_ptr() + pool.numel() * pool.element_size()
        assert r.embeddings.is_contiguous() and r.fill_ids.is_contiguous() and r.mrope_positions.is_contiguous()
        assert lang.allocator.free_blocks == 16 - 8          # 1000 tokens: 8 blocks lent to the result
        assert lang.stats["zero_copy"] == 1
        # a second one while the first is held: views of blocks further into the pool
        room2 = next(_rooms)
        lang.request(room2, expected_tokens=300)
        enc.send(room2, 300)
        assert lang.wait(room2, 30) is Status.Success
        r1 = lang.result(room2)
        assert data.verify(room2, r1) and lang.stats["zero_copy"] == 2
        assert r1.embeddings.data_ptr() >= pool.data_ptr() + 8 * lang.layout.emb_block_bytes
        r.release()
        r1.release()
        assert lang.allocator.free_blocks == 16
        # a request that needs a resume is gathered as usual
        r2, _ = run_one(lang, enc, data, 2500)
        assert r2.chunks == 2 and lang.stats["zero_copy"] == 2
        r2.release()
        check_clean(lang)


def test_take_finished_reports_each_finished_room_once(encoder, data):
    """track_finished / take_finished: the rooms whose request reached Success or Failed since
    the last call, each once, failures included; nothing is recorded before track_finished,
    and polling the open rooms is then unnecessary (the vLLM consumer reads only these)."""
    cfg, enc = encoder
    with LanguageEndpoint(cfg.replace(request_timeout=2.0)) as lang:
        before = next(_rooms)
        lang.request(before)
        enc.send(before, 10)
        assert lang.wait(before, 30) is Status.Success
        assert lang.take_finished() == [] and not lang.finished_pending()    # not tracked yet
        lang.result(before)
        lang.track_finished()
        rooms = [next(_rooms) for _ in range(6)]
        for room in rooms:
            lang.request(room)
        enc.send_many((room, 50 + 37 * i) for i, room in enumerate(rooms[:5]))
        lost = rooms[5]                                       # never sent: fails at request_timeout
        got, deadline = [], time.monotonic() + 30
        while len(got) < len(rooms) and time.monotonic() < deadline:
            got += lang.take_finished()
            time.sleep(0.005)
        assert sorted(got) == sorted(rooms), got               # each once
        assert lang.take_finished() == [] and not lang.finished_pending()
        for i, room in enumerate(rooms[:5]):
            assert lang.poll(room) is Status.Success
            r = lang.result(room)
            assert r.total_tokens == 50 + 37 * i and data.verify(room, r)
        assert lang.poll(lost) is Status.Failed
        with pytest.raises(Exception):
            lang.result(lost)
        check_clean(lang)
