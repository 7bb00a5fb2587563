import multiprocessing as mp
import os
import socket
import threading
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st

from embresume.config import Config
from embresume.errors import ConfigError
from embresume.ipc.ring import RingClosed, RingTimeout, ShmRing
from embresume.ipc import unix
from embresume.ipc.shm import ShmSegment


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=60))
def test_ring_preserves_order_and_bytes_across_wraparound(msgs):
    w = ShmRing.create(4096)
    r = ShmRing.from_handles(w.handles())
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
    r = ShmRing.from_handles(w.handles())
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


def _child_echo(sock):
    data, fds = unix.recv(sock)
    assert data == b"rings" and len(fds) == 6
    rin, rout = ShmRing.from_handles(fds[:3]), ShmRing.from_handles(fds[3:])
    unix.close_all(fds)
    for _ in range(100):
        rout.send(rin.recv(timeout=10))
    rin.close()
    rout.close()


def test_ring_between_processes():
    """The rings travel as fds (memfd + eventfds) over a Unix socket, as in the handshake."""
    a, b = ShmRing.create(1 << 16), ShmRing.create(1 << 16)
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    p = mp.get_context("spawn").Process(target=_child_echo, args=(there,))
    p.start()
    try:
        there.close()
        unix.send(here, b"rings", a.handles() + b.handles())
        for i in range(100):
            a.send(os.urandom(i * 7) + bytes([i]))
            m = b.recv(timeout=10)
            assert m is not None and m[-1] == i and len(m) == i * 7 + 1
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
        here.close()
        a.close()
        b.close()
    assert p.exitcode == 0


def test_ring_refuses_what_is_not_a_sealed_ring():
    w = ShmRing.create(4096)
    r_, w_ = os.pipe()
    try:
        seg, items, space = w.handles()
        for bad in ([seg, items], [seg, items, r_], [r_, items, space], "x", [seg, items, 1.5]):
            with pytest.raises(ValueError):
                ShmRing.from_handles(bad)
        plain = ShmSegment.create(8192)
        try:                          # a sealed memfd whose header claims more than it holds
            plain.raw[128:136] = torch.tensor([1 << 20], dtype=torch.int64).view(torch.uint8)
            with pytest.raises(ValueError, match="capacity"):
                ShmRing.from_handles([plain.fd, items, space])
        finally:
            plain.close()
    finally:
        os.close(r_)
        os.close(w_)
        w.close()


def test_wake_reader_and_stale_doorbell():
    w = ShmRing.create(4096)
    r = ShmRing.from_handles(w.handles())
    try:
        for i in range(5):
            w.send(bytes([i]))
        assert [r.recv(timeout=1) for _ in range(5)] == [bytes([i]) for i in range(5)]
        t0 = time.monotonic()
        assert r.recv(timeout=0.2) is None              # the stale doorbell does not end the wait
        assert time.monotonic() - t0 >= 0.19
        threading.Timer(0.05, r.wake_reader).start()
        t0 = time.monotonic()
        assert r.recv(timeout=5) is None and time.monotonic() - t0 < 2
    finally:
        r.close()
        w.close()


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


def test_spinning_reader_catches_the_next_message_and_an_idle_one_sleeps():
    """The spin follows a received message only: an idle reader sleeps on its
    doorbell at once (no CPU), a busy one picks up the next message while it
    spins, and one that spun in vain still sleeps until its timeout."""
    w = ShmRing.create(4096)
    r = ShmRing.from_handles(w.handles())
    try:
        c0 = time.thread_time()
        assert r.recv(timeout=0.3, spin=1.0) is None     # never received: no spin at all
        assert time.thread_time() - c0 < 0.1             # it slept (a 1 s spin would burn ~0.3 s)
        w.send(b"first")
        assert r.recv(timeout=1, spin=1.0) == b"first"
        threading.Timer(0.02, w.send, (b"second",)).start()
        t0 = time.monotonic()
        assert r.recv(timeout=5, spin=1.0) == b"second"  # arrived while spinning
        assert time.monotonic() - t0 < 1.0
        t0 = time.monotonic()
        assert r.recv(timeout=0.3, spin=0.05) is None    # spun 50 ms, then slept to the timeout
        assert time.monotonic() - t0 >= 0.29
        c0 = time.thread_time()
        assert r.recv(timeout=0.3, spin=1.0) is None     # the last call got nothing: no spin now
        assert time.thread_time() - c0 < 0.1
        w.close_writer()
        with pytest.raises(RingClosed):
            r.recv(timeout=1, spin=1.0)
    finally:
        r.close()
        w.close()


def test_ring_spin_config(monkeypatch):
    monkeypatch.delenv("EMBRESUME_RING_SPIN_US", raising=False)
    assert Config().ring_spin_us == 200
    monkeypatch.setenv("EMBRESUME_RING_SPIN_US", "0")
    assert Config().ring_spin_us == 0
    assert Config(ring_spin_us=50).ring_spin_us == 50      # explicit beats env
    for bad in (-1, 2_000_000, 1.5, True):
        with pytest.raises(ConfigError, match="ring_spin_us"):
            Config(ring_spin_us=bad)
