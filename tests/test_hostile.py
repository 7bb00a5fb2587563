"""Hostile and faulty peers on the same host: each attack that once worked is a test.

* another uid cannot connect (the kernel's SO_PEERCRED uid is checked at
  accept: it is closed before it can send a byte, learns nothing), unless
  configured (``allowed_uids``); a language rank refuses an encoder of a uid
  it does not allow (nobody can squat the socket name and impersonate one);
* no peer can make the encoder's mapping of its pool shrink (sealed memfds:
  ftruncate fails; an unsealed fd is refused at the handshake);
* a session id cannot be taken over by a second connection;
* a same-host peer asking for Mooncake cannot make an ``auto`` encoder open
  engines (ports on all interfaces);
* kill -9 of a language process at any moment of its start-up leaves
  nothing named and nothing mapped in the encoder;
* the handshake socket is bounded: packet size, fds per packet, half-open
  connections (dropped after ``handshake_timeout``).

The other-uid tests create a throwaway user when running as root and skip
otherwise.  The tcp side (auth keys, keyless refusal) is in test_auth.py.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import shutil
import signal
import subprocess
import time

import pytest

from embresume import protocol as P
from embresume.blocks import BlockLayout
from embresume.encoder import EncoderEndpoint
from embresume.errors import PeerError
from embresume.ipc import unix
from embresume.ipc.ring import ShmRing
from embresume.language import LanguageEndpoint
from embresume.node import pid_alive
from embresume.procutil import PipeQueue
from embresume.synthetic import SyntheticData

from conftest import fd_links, layout_dict, make_config, wait_until

HIDDEN = 256






def _raw_hello(enc: EncoderEndpoint, cfg, session: str = "raw", offer=("shm",)):
    """A hand-made same-host handshake up to the encoder's hello reply."""
    sock = unix.connect(enc.unix_name, 5.0)
    hello = {"phase": "hello", "layout": layout_dict(cfg), "offer": list(offer)}
    unix.send(sock, P.encode(P.Register(P.Role.LANGUAGE, session, "n", os.getpid(), 0, "", hello)))
    data, fds = unix.recv_blocking(sock, time.monotonic() + 5)
    unix.close_all(fds)
    return sock, P.decode(data)


def _my_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _memfds() -> int:
    return len(fd_links("/memfd:embresume"))


# ---------------------------------------------------------------- another uid
@pytest.fixture(scope="module")
def other_user():
    """(uid, gid) of a throwaway user, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a throwaway user (CI runs as root)")
    if shutil.which("useradd") is None:
        pytest.skip("needs useradd to create a throwaway user")
    name = f"embr{secrets.token_hex(4)}"
    r = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"useradd failed: {r.stderr.strip()}")
    try:
        import pwd
        pw = pwd.getpwnam(name)
        yield pw.pw_uid, pw.pw_gid
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def _become(uid: int, gid: int) -> None:
    # everything the role needs is imported before the privileges go
    import torch  # noqa: F401
    import embresume.encoder  # noqa: F401
    import embresume.language  # noqa: F401
    import embresume.transport.shm  # noqa: F401
    import embresume.ipc.channel  # noqa: F401
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def _intruder(uid, gid, cfg, rooms, verify_seed, res_q):
    """Child: a language rank running as another uid."""
    _become(uid, gid)
    out = {"uid": os.getuid()}
    # a raw hello first: what does the socket say to a uid it does not allow?
    try:
        s = unix.connect(unix.socket_name(cfg.encoder_endpoint), 5.0)
        try:
            unix.send(s, P.encode(P.Register(P.Role.LANGUAGE, "x", "n", os.getpid(), 0, "", {"phase": "hello"})))
            data, fds = unix.recv_blocking(s, time.monotonic() + 5)
            unix.close_all(fds)
            out["raw"] = data
        except OSError as e:
            out["raw"] = f"{type(e).__name__}"
        finally:
            s.close()
    except OSError as e:
        out["raw"] = f"connect: {type(e).__name__}"
    try:
        with LanguageEndpoint(cfg) as lang:
            data = SyntheticData(HIDDEN, "bf16", 4000, seed=verify_seed)
            out["verified"] = [data.verify(r, lang.recv(r, timeout=20)) for r in rooms]
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    res_q.put(out)


def _foreign_encoder(uid, gid, cfg, res_q, cmd_q):
    """Child: an encoder running as another uid (a squatter, or a real one)."""
    _become(uid, gid)
    try:
        with EncoderEndpoint(cfg) as enc:
            res_q.put(("ready", enc.address))
            cmd_q.get(timeout=60)
    except Exception as e:
        res_q.put(("error", f"{type(e).__name__}: {e}"))


def _run_child(target, args, timeout=60.0):
    ctx = mp.get_context("spawn")
    res_q = PipeQueue(ctx)
    p = ctx.Process(target=target, args=(*args, res_q), daemon=True)
    p.start()
    try:
        return res_q.get(timeout=timeout)
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)


def test_another_uid_is_refused_and_learns_nothing(other_user):
    uid, gid = other_user
    cfg = make_config("shm")
    data = SyntheticData(HIDDEN, "bf16", 4000, seed=5)
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as lang:
        for room in range(10):
            enc.send_tensors(room, *data.sample(room, 500 + 300 * room))
        # the intruder accepts a root encoder, but the encoder does not accept it
        out = _run_child(_intruder, (uid, gid, cfg.replace(allowed_uids=(0,), handshake_timeout=3.0), range(10), 5))
        assert out["uid"] == uid
        assert out["raw"] in (b"", "ConnectionResetError", "BrokenPipeError"), out   # closed, not a byte said
        assert "verified" not in out and "closed the handshake" in out["error"], out
        assert enc.stats["refused_uid"] >= 2
        assert [p["session_id"] for p in enc.peers()] == [lang._encoders[cfg.encoder_endpoint].link.session_id]
        for room in range(10):                                  # the legitimate rank lost nothing
            assert data.verify(room, lang.recv(room, timeout=20))


def test_an_allowed_other_uid_is_served(other_user):
    uid, gid = other_user
    cfg = make_config("shm", allowed_uids=(uid,))
    data = SyntheticData(HIDDEN, "bf16", 4000, seed=6)
    with EncoderEndpoint(cfg) as enc:
        for room in range(3):
            enc.send_tensors(room, *data.sample(room, 700 * (room + 1)))
        out = _run_child(_intruder, (uid, gid, cfg.replace(allowed_uids=(0,)), range(3), 6))
    assert out.get("verified") == [True, True, True], out


def test_a_rank_refuses_an_encoder_of_another_uid(other_user):
    """Whoever binds the socket name first cannot impersonate the encoder."""
    uid, gid = other_user
    cfg = make_config("shm")
    ctx = mp.get_context("spawn")
    res_q, cmd_q = PipeQueue(ctx), PipeQueue(ctx)
    p = ctx.Process(target=_foreign_encoder, args=(uid, gid, cfg.replace(allowed_uids=(0,)), res_q, cmd_q),
                    daemon=True)
    p.start()
    try:
        kind, what = res_q.get(timeout=60)
        assert kind == "ready", what
        with pytest.raises(PeerError, match=f"runs as uid {uid}, which is not an allowed uid"):
            LanguageEndpoint(cfg.replace(handshake_timeout=3.0))
        with LanguageEndpoint(cfg.replace(allowed_uids=(uid,))) as lang:     # configured: accepted
            assert lang.connected
    finally:
        cmd_q.put("stop")
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)


# ---------------------------------------------------------------- shared memory
def test_no_peer_can_shrink_a_mapped_pool_or_ring():
    cfg = make_config("shm")
    data = SyntheticData(HIDDEN, "bf16", 4000, seed=7)
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as lang:
        fd = lang.pool.backing.segment.fd
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 4096)
        with open(f"/proc/self/fd/{fd}", "r+b") as again:      # another open file of the same memfd
            with pytest.raises(PermissionError):
                os.ftruncate(again.fileno(), 0)
        ring = lang._encoders[cfg.encoder_endpoint].link.channel.tx
        with pytest.raises(PermissionError):
            os.ftruncate(ring.seg.fd, 0)
        for room in range(5):
            enc.send_tensors(room, *data.sample(room, 1500))
            assert data.verify(room, lang.recv(room, timeout=20))


@pytest.mark.parametrize("what", ["unsealed pool", "sealable but unsealed pool", "pipe as pool",
                                  "unsealed ring", "pipe as doorbell", "missing fd"])
def test_a_pool_or_ring_that_could_shrink_is_refused(what):
    cfg = make_config("shm")
    layout = layout_dict(cfg)
    nbytes = BlockLayout.from_dict(layout).nbytes
    with EncoderEndpoint(cfg) as enc:
        sock, hello = _raw_hello(enc, cfg)
        assert hello.desc["phase"] == "hello" and hello.transport == "shm"
        rings = [ShmRing.create(4096), ShmRing.create(4096)]
        r_pipe, w_pipe = os.pipe()
        plain = os.memfd_create("embresume-pool", os.MFD_CLOEXEC)
        sealable = os.memfd_create("embresume-pool", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        unsealed_ring = os.memfd_create("embresume-ring", os.MFD_CLOEXEC)
        try:
            for fd in (plain, sealable):
                os.ftruncate(fd, nbytes)
            os.ftruncate(unsealed_ring, 192 + 4096)
            from embresume.ipc.shm import ShmSegment
            good = ShmSegment.create(nbytes, prefault=False)
            pool_fd = {"unsealed pool": plain, "sealable but unsealed pool": sealable,
                       "pipe as pool": r_pipe}.get(what, good.fd)
            l2e = [unix.Fd(x) for x in rings[0].handles()]
            e2l = [unix.Fd(x) for x in rings[1].handles()]
            if what == "unsealed ring":
                l2e[0] = unix.Fd(unsealed_ring)
            if what == "pipe as doorbell":
                e2l[1] = unix.Fd(r_pipe)
            pool = {"fd": unix.Fd(pool_fd), "nbytes": nbytes, "layout": layout}
            if what == "missing fd":
                pool["fd"] = 3                      # a number, not a passed fd
            desc, fds = unix.pack_fds({"phase": "pool", "pool": pool, "rings": {"l2e": l2e, "e2l": e2l}})
            unix.send(sock, P.encode(P.Register(P.Role.LANGUAGE, "raw", "n", os.getpid(), 0, "shm", desc)), fds)
            data, got = unix.recv_blocking(sock, time.monotonic() + 5)
            unix.close_all(got)
            bye = P.decode(data)
            assert isinstance(bye, P.Bye), bye
            assert any(w in bye.reason for w in ("not sealed", "not a sealable memfd", "not an eventfd",
                                                 "carries no fd")), bye.reason
            assert enc.peers() == []
            good.close()
        finally:
            sock.close()
            for fd in (r_pipe, w_pipe, plain, sealable, unsealed_ring):
                os.close(fd)
            for r in rings:
                r.close()
        # nothing of the refused peer stays mapped in the encoder, and it still serves
        assert wait_until(lambda: _memfds() == 0, 5), _memfds()
        d = SyntheticData(HIDDEN, "bf16", 4000, seed=8)
        with LanguageEndpoint(cfg) as lang:
            enc.send_tensors(1, *d.sample(1, 2000))
            assert d.verify(1, lang.recv(1, timeout=20))


# ---------------------------------------------------------------- sessions and transports
def test_a_live_session_id_cannot_be_taken_over():
    cfg = make_config("shm")
    data = SyntheticData(HIDDEN, "bf16", 4000, seed=9)
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as lang:
        victim = lang._encoders[cfg.encoder_endpoint].link.session_id
        thief = LanguageEndpoint(cfg.replace(handshake_timeout=3.0), connect=False)
        try:
            thief._session = lambda: victim                     # a leaked session id
            with pytest.raises(PeerError, match="already connected"):
                thief.connect()
        finally:
            thief.close()
        assert [p["session_id"] for p in enc.peers()] == [victim]
        for room in range(5):
            enc.send_tensors(room, *data.sample(room, 1200))
            assert data.verify(room, lang.recv(room, timeout=20))


def test_a_local_peer_cannot_make_an_auto_encoder_open_mooncake():
    try:
        import embresume.transport.mooncake  # noqa: F401
        from mooncake.engine import TransferEngine  # noqa: F401
    except Exception as e:
        pytest.skip(f"Mooncake unavailable: {e}")
    cfg = make_config("auto")
    with EncoderEndpoint(cfg) as enc:
        for _ in range(5):
            with pytest.raises(PeerError, match="no common transport"):
                LanguageEndpoint(cfg.replace(transport="mooncake", handshake_timeout=3.0))
        assert not [t for t in enc._transports.instances() if t.name == "mooncake"]
        assert enc.peers() == []


# ---------------------------------------------------------------- kill -9
def _starting_rank(cfg, res_q):
    res_q.put(os.getpid())
    with LanguageEndpoint(cfg):
        res_q.put("up")
        time.sleep(60)


def test_kill_9_during_start_up_leaves_nothing():
    """Killed at any moment (pool creation, handshake, connected), a language
    process leaves no name anywhere and nothing mapped in the encoder."""
    cfg = make_config("shm", pool_blocks=256)
    ctx = mp.get_context("spawn")
    delays = [0.0, 0.05, 0.15, 0.3, 0.5, 0.8, 1.2, 2.0]
    with EncoderEndpoint(cfg) as enc:
        base = _memfds()
        for delay in delays:
            res_q = PipeQueue(ctx)
            p = ctx.Process(target=_starting_rank, args=(cfg, res_q), daemon=True)
            p.start()
            try:
                res_q.get(timeout=60)                   # running: the start-up begins now
                time.sleep(delay)
                os.kill(p.pid, signal.SIGKILL)
                p.join(10)
            finally:
                if p.is_alive():
                    p.kill()
                    p.join(5)
            assert not pid_alive(p.pid)
            assert not [n for n in os.listdir("/dev/shm") if n.startswith(("embr-", "sem.embr-"))]
            # the encoder notices at once (the handshake socket's EOF) and unmaps its pool
            assert wait_until(lambda: not enc.peers() and _memfds() == base, 10), (delay, enc.peers(), _memfds())


# ---------------------------------------------------------------- bounded input
def test_handshake_socket_bounds_packets_and_fds():
    cfg = make_config("shm")
    with EncoderEndpoint(cfg) as enc:
        fds0 = _my_fds()
        # too large a packet: dropped, and the connection with it
        s = unix.connect(enc.unix_name, 5.0)
        s.sendall(b"x" * (unix.MAX_PACKET + 100))
        assert unix.recv_blocking(s, time.monotonic() + 5)[0] == b""
        s.close()
        # too many fds: all closed on our side of the encoder, connection dropped
        s = unix.connect(enc.unix_name, 5.0)
        pipes = [os.pipe() for _ in range(unix.MAX_FDS + 4)]
        try:
            import socket as _s
            _s.send_fds(s, [b"hello?"], [r for r, _ in pipes])
            assert unix.recv_blocking(s, time.monotonic() + 5)[0] == b""
        finally:
            s.close()
            for r, w in pipes:
                os.close(r)
                os.close(w)
        # garbage and a bad JSON nesting: a Bye naming the problem, nothing kept
        for junk in (b"\x00" * 64, P.encode(P.Register(P.Role.LANGUAGE, "deep", "n", 1, 0, "",
                                                        {"phase": "hello", "layout": _nest(200)}))):
            s = unix.connect(enc.unix_name, 5.0)
            unix.send(s, junk)
            data, _ = unix.recv_blocking(s, time.monotonic() + 5)
            assert isinstance(P.decode(data), P.Bye)
            s.close()
        assert wait_until(lambda: _my_fds() <= fds0, 5), (_my_fds(), fds0)
        assert enc.stats["bad_handshakes"] >= 4 and enc.peers() == []


def _nest(depth: int):
    d: dict = {}
    for _ in range(depth):
        d = {"a": d}
    return d


def test_half_open_connections_are_bounded_and_expire():
    from embresume.encoder import MAX_PENDING_HANDSHAKES
    cfg = make_config("shm", handshake_timeout=1.5)
    socks = []
    with EncoderEndpoint(cfg) as enc:
        try:
            for _ in range(MAX_PENDING_HANDSHAKES + 40):
                socks.append(unix.connect(enc.unix_name, 5.0))
            assert wait_until(lambda: enc._unix.connections() <= MAX_PENDING_HANDSHAKES, 5)
            # a legitimate rank still gets in meanwhile
            with LanguageEndpoint(cfg.replace(handshake_timeout=10.0)) as lang:
                assert lang.connected
                assert wait_until(lambda: enc._unix.connections() == 1, 10), enc._unix.connections()
        finally:
            for s in socks:
                s.close()


# ---------------------------------------------------------------- rooms and values
def test_another_session_cannot_disrupt_or_join_a_room():
    """A room's ranks are fixed by its first INITs: another session asking for
    it (any required_dst_info_num) is told Failed; the room is left alone."""
    cfg = make_config("shm")
    data = SyntheticData(HIDDEN, "bf16", 4000, seed=11)
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as lang, LanguageEndpoint(cfg) as other:
        for room in range(5):
            lang.request(room)
            assert wait_until(lambda: room in enc._rooms and len(enc._rooms[room].ranks) == 1, 10)
            for required in (2, 1, 3):
                other.request(room, required_dst_info_num=required)
                assert other.wait(room, 10).name == "Failed"
                assert "more than required_dst_info_num=1" in other.failure_reason(room)
                other._reqs.pop(room, None)
            enc.send_tensors(room, *data.sample(room, 1000 + 500 * room))
            assert data.verify(room, lang.recv(room, timeout=20))
        assert other.allocator.free_blocks == other.layout.num_blocks


def test_tensor_parallel_ranks_that_disagree_all_fail_at_once():
    cfg = make_config("shm")
    with EncoderEndpoint(cfg) as enc, LanguageEndpoint(cfg) as r0, LanguageEndpoint(cfg, tp_rank=1) as r1:
        r0.request(7, required_dst_info_num=2)
        assert wait_until(lambda: 7 in enc._rooms, 10)
        r1.request(7, required_dst_info_num=3)
        t0 = time.monotonic()
        assert r0.wait(7, 10).name == "Failed" and r1.wait(7, 10).name == "Failed"
        assert time.monotonic() - t0 < 5                          # told, not timed out
        assert "disagree" in r0.failure_reason(7) and "disagree" in r1.failure_reason(7)
        assert wait_until(lambda: r0.allocator.free_blocks == r0.layout.num_blocks
                           and r1.allocator.free_blocks == r1.layout.num_blocks, 10)


def test_encoder_values_fail_at_the_call():
    from embresume.errors import InvalidArgument
    data = SyntheticData(HIDDEN, "bf16", 4000, seed=12)
    e, f, m, _ = data.sample(1, 100)
    with EncoderEndpoint(make_config("shm")) as enc:
        for room, delta in ((2 ** 64, 0), (-1, 0), ("x" * 300, 0), (1, 2 ** 31), (1, -2 ** 31 - 1), (1, 1.5)):
            with pytest.raises(ValueError):
                enc.send_tensors(room, e, f, m, delta)
        with pytest.raises(InvalidArgument):
            enc.send_tensors(1, e, f, m, True)
        assert not enc._rooms


def test_a_zombie_process_is_dead():
    p = subprocess.Popen(["true"])
    assert wait_until(lambda: open(f"/proc/{p.pid}/stat").read().split(") ")[1][0] == "Z", 5)
    try:
        assert not pid_alive(p.pid)                 # exited, not yet reaped
    finally:
        p.wait()
    assert pid_alive(os.getpid())


def test_init_with_too_many_blocks_is_refused_quickly():
    big = P.encode(P.Init(1, "e", 0, "s", tuple(range(P.MAX_BLOCKS)), 1, P.MAX_BLOCKS * 128, 1))
    t0 = time.monotonic()
    P.decode(big)                                                # the largest allowed decodes
    assert time.monotonic() - t0 < 2
    bad = bytearray(big)
    # the block count field claims 16M: refused before any per-block work
    import struct
    n_at = bytes(big).find(struct.pack("<I", P.MAX_BLOCKS))
    assert n_at > 0
    bad[n_at:n_at + 4] = struct.pack("<I", 1 << 24)
    t0 = time.monotonic()
    with pytest.raises(ValueError):
        P.decode(bytes(bad))
    assert time.monotonic() - t0 < 0.5


def test_tcp_half_open_hellos_are_bounded_and_expire(monkeypatch):
    """With a key, tcp hellos that never complete are at most 256 and go after
    handshake_timeout."""
    import zmq
    from embresume import auth
    from embresume.encoder import MAX_PENDING_HANDSHAKES
    from embresume.transport import select
    if select.unavailable_reason("mooncake"):
        pytest.skip(f"a tcp hello needs a transport for tcp peers: {select.unavailable_reason('mooncake')}")
    cfg = make_config("auto", auth_key="x" * 40, handshake_timeout=1.5)
    ctx = zmq.Context.instance()
    socks = []
    with EncoderEndpoint(cfg) as enc:
        try:
            hello = {"phase": "hello", "layout": layout_dict(cfg), "offer": ["mooncake"]}
            for i in range(MAX_PENDING_HANDSHAKES + 60):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                auth.make_client(s, auth.keys_for(cfg))
                s.connect(enc.address)
                s.send(P.encode(P.Register(P.Role.LANGUAGE, f"h{i}", "n", 1, 0, "", hello)))
                socks.append(s)
            assert wait_until(lambda: len(enc._handshakes) >= 100, 20), len(enc._handshakes)
            assert len(enc._handshakes) <= MAX_PENDING_HANDSHAKES
            assert wait_until(lambda: len(enc._handshakes) == 0, 10), len(enc._handshakes)
        finally:
            for s in socks:
                s.close()


@pytest.mark.parametrize("n", [40])
def test_first_frame_after_ready_is_never_a_heartbeat(n):
    """The handshake race: a 5 ms heartbeat never beats the 'ready' reply."""
    cfg = make_config("shm", heartbeat_interval=0.005, peer_timeout=2.0)
    with EncoderEndpoint(cfg) as enc:
        for _ in range(n):
            with LanguageEndpoint(cfg) as lang:
                assert lang.connected
        assert wait_until(lambda: enc.peers() == [], 10)
