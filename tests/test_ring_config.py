import multiprocessing as mp
import os
import threading

import pytest
from hypothesis import given, settings, strategies as st

from embresume.config import Config
from embresume.errors import ConfigError
from embresume.ipc.ring import RingClosed, RingTimeout, ShmRing
from embresume.ipc.shm import ShmSegment


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=60))
def test_ring_preserves_order_and_bytes_across_wraparound(msgs):
    w = ShmRing.create(4096)
    r = ShmRing.attach(w.name)
    try:
        got = []

        def reader():
            while len(got) < len(msgs):
                m = r.recv(timeout=5)
                assert m is not None
                got.append(m)

        t = threading.Thread(target=reader)
        t.start()
        for m in msgs:
            w.send(m, timeout=5)
        t.join(10)
        assert got == msgs
    finally:
        r.close()
        w.close()


def test_ring_full_times_out_and_close_wakes_reader():
    w = ShmRing.create(4096)
    r = ShmRing.attach(w.name)
    try:
        w.send(b"a" * 4000)
        with pytest.raises(RingTimeout):
            w.send(b"b" * 100, timeout=0.2)
        assert r.recv(timeout=1) == b"a" * 4000
        with pytest.raises(ValueError):
            w.send(b"x" * 5000)
        assert r.recv(timeout=0.05) is None
        w.close_writer()
        with pytest.raises(RingClosed):
            r.recv(timeout=1)
    finally:
        r.close()
        w.close()


def _child_echo(name_in, name_out):
    rin, rout = ShmRing.attach(name_in), ShmRing.attach(name_out)
    for _ in range(100):
        rout.send(rin.recv(timeout=10))
    rin.close()
    rout.close()


def test_ring_between_processes():
    a, b = ShmRing.create(1 << 16), ShmRing.create(1 << 16)
    p = mp.get_context("spawn").Process(target=_child_echo, args=(a.name, b.name))
    p.start()
    try:
        for i in range(100):
            a.send(os.urandom(i * 7) + bytes([i]))
            m = b.recv(timeout=10)
            assert m is not None and m[-1] == i and len(m) == i * 7 + 1
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
        a.close()
        b.close()


def test_segment_mode_and_unlink():
    s = ShmSegment.create(8192, prefault=True)
    try:
        assert os.stat(f"/dev/shm{s.name}").st_mode & 0o777 == 0o600
        s.raw[:4] = 7
        t = ShmSegment.attach(s.name, 8192)
        assert int(t.raw[3]) == 7
        s.unlink()
        assert not os.path.exists(f"/dev/shm{s.name}")
        t.raw[0] = 9                 # mappings outlive the name
        assert int(s.raw[0]) == 9
        t.close()
    finally:
        s.close()


def test_config_env_and_precedence(monkeypatch):
    monkeypatch.setenv("SGLANG_EMBEDDING_DEFAULT_ALLOCATE_BUFFER_SIZE", "4096")
    monkeypatch.setenv("SGLANG_MULTIMODAL_BLOCK_SIZE", "64")
    monkeypatch.setenv("SGLANG_EMBEDDING_CACHE_BUFFER_SIZE", "3")
    c = Config()
    assert (c.default_allocate_tokens, c.block_size, c.cache_buffers) == (4096, 64, 3)
    assert c.total_pool_blocks == 3 * 64
    monkeypatch.setenv("EMBRESUME_BLOCK_SIZE", "32")       # beats the SGLANG_ name
    assert Config().block_size == 32
    assert Config(block_size=16).block_size == 16           # explicit beats env
    monkeypatch.setenv("EMBRESUME_CACHE_BUFFERS", "lots")
    with pytest.raises(ConfigError, match="EMBRESUME_CACHE_BUFFERS"):
        Config()


def test_config_defaults_and_validation(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("EMBRESUME_", "SGLANG_")):
            monkeypatch.delenv(k)
    c = Config()
    assert (c.default_allocate_tokens, c.block_size, c.cache_buffers) == (8192, 128, 64)
    assert c.total_pool_blocks == 64 * 64
    for bad in (dict(block_size=0), dict(hidden_size=-1), dict(dtype="int8"), dict(transport="carrier-pigeon"),
                dict(peer_timeout=0.1, heartbeat_interval=0.5), dict(aux_ints=4), dict(device="tpu")):
        with pytest.raises(ConfigError):
            Config(**bad)
