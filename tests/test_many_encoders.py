"""M encoders feeding one language instance: one receive pool per endpoint,
per-request encoder, str and int keys, size hints, encoder death and restart.

Runs against every transport (shm, Mooncake over tcp, cuda_ipc with a GPU).
"""

import contextlib
import os
import random
import threading
import time

import pytest

from embresume.harness import EncoderProcess
from embresume.language import LanguageEndpoint
from embresume.status import Status
from embresume.synthetic import SyntheticData

from conftest import device_of, fd_links, make_config

HIDDEN = 256
MAX_TOKENS = 6000
SEED = 9


def _spec(transport):
    return (HIDDEN, "bf16", MAX_TOKENS, SEED, device_of(transport))


@pytest.fixture(scope="module")
def data():
    return SyntheticData(HIDDEN, "bf16", MAX_TOKENS, seed=SEED)


@contextlib.contextmanager
def encoders(transport, n, **kw):
    with contextlib.ExitStack() as stack:
        procs = []
        for _ in range(n):
            cfg = make_config(transport, **kw)
            procs.append(stack.enter_context(EncoderProcess(cfg, data_spec=_spec(transport))))
        yield procs


def _threads_and_fds():
    return threading.active_count(), len(os.listdir("/proc/self/fd"))


def test_three_encoders_two_tp_ranks_300_requests(transport, data):
    """300 requests, each to a random one of 3 encoder processes, received by a
    language instance of 2 tensor-parallel ranks; int and str keys; half with an
    exact size hint (never a resume), half without (resumes past 1024 tokens)."""
    rng = random.Random(3)
    with encoders(transport, 3) as encs:
        cfg = make_config(transport, pool_blocks=96, default_allocate_tokens=1024, request_timeout=60.0)
        work = []
        for i in range(300):
            room = i if i % 2 else f"mm-hash-{i:04d}-\u00e9"
            tokens = rng.randint(1, 5 * cfg.default_allocate_tokens)
            hinted = rng.random() < 0.5
            work.append((room, tokens, hinted, rng.randrange(3)))
        with LanguageEndpoint(cfg, tp_rank=0, connect=False) as r0, \
                LanguageEndpoint(cfg, tp_rank=1, connect=False) as r1:
            ranks = (r0, r1)
            inflight = 12
            for b in range(0, len(work), inflight):
                batch = work[b:b + inflight]
                for room, tokens, hinted, e in batch:
                    for lang in ranks:
                        st = lang.request(room, encoder=encs[e].address, required_dst_info_num=2,
                                          expected_tokens=tokens if hinted else None)
                        assert st in (Status.Bootstrapping, Status.WaitingForInput)
                for e in range(3):
                    encs[e].send_many([(room, tokens) for room, tokens, _, ee in batch if ee == e])
                for room, tokens, hinted, e in batch:
                    for lang in ranks:
                        st = lang.wait(room, 60)
                        assert st is Status.Success, f"{room!r}: {st.name} {lang.failure_reason(room)}"
                        res = lang.result(room)
                        assert res.total_tokens == tokens and data.verify(room, res), room
                        if hinted:
                            assert res.resumes == 0, (room, tokens)
                        elif tokens > cfg.default_allocate_tokens:
                            # the rest is asked for in one resume, or more when the pool is short
                            assert res.resumes >= 1
                        res.release()
            for lang in ranks:
                assert lang.allocator.free_blocks == lang.layout.num_blocks
                assert lang.allocator.rooms() == []
                assert len(lang.encoders()) == 3 and all(e["state"] == "up" for e in lang.encoders())
                # one pool, exported once, whatever the number of encoders
                assert len(lang._exports) == 1
                assert lang.stats["hinted"] == sum(1 for w in work if w[2])


def test_kill_one_encoder_only_its_rooms_fail_then_it_restarts(transport, data):
    cfg = make_config(transport, pool_blocks=64, default_allocate_tokens=512, request_timeout=30.0,
                      peer_timeout=1.5, heartbeat_interval=0.2)
    with encoders(transport, 3, peer_timeout=1.5, heartbeat_interval=0.2) as encs, \
            LanguageEndpoint(cfg, connect=False) as lang:
        addrs = [e.address for e in encs]
        # warm up: every encoder connected and serving
        for i, e in enumerate(encs):
            room = f"warm-{i}"
            lang.request(room, encoder=addrs[i])
            e.send(room, 300)
            assert lang.wait(room, 30) is Status.Success, lang.failure_reason(room)
            lang.result(room).release()
        # rooms requested from all three; encoder 1 never sends and is killed
        rooms = {i: [f"k{i}-{j}" for j in range(4)] for i in range(3)}
        for i in range(3):
            for room in rooms[i]:
                lang.request(room, encoder=addrs[i], expected_tokens=200)
        t_kill = time.monotonic()
        encs[1].kill()
        for i in (0, 2):
            encs[i].send_many([(room, 200) for room in rooms[i]])
        for room in rooms[1]:
            assert lang.wait(room, 10) is Status.Failed
            assert addrs[1] in lang.failure_reason(room)
        assert time.monotonic() - t_kill < cfg.peer_timeout + 2.0
        for i in (0, 2):
            for room in rooms[i]:
                assert lang.wait(room, 30) is Status.Success, lang.failure_reason(room)
                assert data.verify(room, lang.result(room))
        for room in rooms[1]:
            with pytest.raises(Exception):
                lang.result(room)               # TransferFailed, and the record is gone
        assert lang.allocator.free_blocks == 64
        # restarted at the same address: the same endpoint reconnects on the next request
        restart_cfg = make_config(transport, encoder_endpoint=addrs[1], peer_timeout=1.5, heartbeat_interval=0.2)
        with EncoderProcess(restart_cfg, data_spec=_spec(transport)) as again:
            for j in range(5):
                room = f"after-restart-{j}"
                lang.request(room, encoder=addrs[1])
                again.send(room, 1500)
                assert lang.wait(room, 30) is Status.Success, lang.failure_reason(room)
                assert data.verify(room, lang.result(room))
            assert lang.stats["reconnects"] >= 1
        assert lang.allocator.free_blocks == 64


def test_pool_is_mapped_once_whatever_the_number_of_encoders(transport, data):
    with encoders(transport, 3) as encs, LanguageEndpoint(make_config(transport), connect=False) as lang:
        pool_ptr = lang.pool.data_ptr()
        name = "/memfd:embresume-pool" if getattr(lang.pool.backing, "segment", None) is not None else "\0"

        def pool_mappings():
            with open("/proc/self/maps") as f:
                return sum(1 for line in f if name in line)

        def pool_fds():
            return len(fd_links(name))

        before, fds_before = pool_mappings(), pool_fds()
        for e in encs:
            lang.connect(e.address)
        assert lang.pool.data_ptr() == pool_ptr
        assert pool_mappings() == before            # no new mapping of pool memory here
        assert len(lang._exports) == 1
        if lang.pool.device.type == "cpu" and transport == "shm":
            assert before >= 1 and pool_fds() == fds_before       # one memfd, handed out, never copied


def test_connect_and_reconnect_leak_nothing(data):
    cfg = make_config("shm", peer_timeout=1.0, heartbeat_interval=0.1)
    with LanguageEndpoint(cfg, connect=False) as lang:
        for cycle in range(3):
            with EncoderProcess(cfg, data_spec=_spec("shm")) as enc:
                for _ in range(10):
                    lang.connect()                  # a no-op on a live connection
                room = f"cycle-{cycle}"
                enc.send(room, 700)
                res = lang.recv(room, timeout=20)
                assert data.verify(room, res)
                res.release()
                if cycle == 0:
                    time.sleep(0.2)
                    base = _threads_and_fds()
            # the encoder is gone: the link is noticed dead and torn down
            deadline = time.monotonic() + 10
            while lang.connected and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not lang.connected
            time.sleep(0.3)
        threads, fds = _threads_and_fds()
        assert threads <= base[0] and fds <= base[1], (base, (threads, fds))


def test_bad_request_arguments_fail_at_the_call_with_nothing_held():
    from embresume.errors import InvalidArgument
    with LanguageEndpoint(make_config("shm"), connect=False) as lang:
        for kw in [dict(room=2 ** 64), dict(room=-1), dict(room="x" * 300), dict(room=1.5), dict(room=True),
                   dict(room=1, required_dst_info_num=0), dict(room=1, required_dst_info_num=-1),
                   dict(room=1, required_dst_info_num=70000), dict(room=1, expected_tokens=0),
                   dict(room=1, expected_tokens=1 << 30), dict(room=1, encoder="garbage")]:
            with pytest.raises(InvalidArgument):
                lang.request(**kw)
        assert lang.allocator.free_blocks == lang.layout.num_blocks
        assert lang.encoders() == []
