"""The Mooncake transport on loopback TCP, two engines in one process.

The destination pool's bytes after a multi-chunk transfer must equal, bit for
bit and over the *whole* pool, a reference pool written by
``kernels.cpu.scatter_chunk`` from the same starting garbage.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import pytest
import torch

from conftest import fd_links

pytestmark = pytest.mark.mooncake

try:
    from embresume.transport import mooncake as mc
    mc.import_mooncake()
except Exception as e:  # pragma: no cover - depends on the machine
    pytest.skip(f"Mooncake transport unavailable: {type(e).__name__}: {e}", allow_module_level=True)

from embresume.blocks import BlockLayout, BlockPool  # noqa: E402
from embresume.errors import TransferError  # noqa: E402
from embresume.harness import free_port  # noqa: E402
from embresume.kernels import cpu as kcpu  # noqa: E402
from embresume.planner import plan_chunk  # noqa: E402
from embresume.source import BlockSource, TensorSource, make_aux  # noqa: E402

MooncakeTransport = mc.MooncakeTransport

BS = 16
HIDDEN = 64
LAYOUT = BlockLayout(num_blocks=40, block_size=BS, hidden=HIDDEN, dtype=torch.bfloat16, aux_ints=16)


def garbage_pool(layout: BlockLayout, seed: int) -> BlockPool:
    pool = BlockPool.create(layout)
    g = torch.Generator().manual_seed(seed)
    pool.backing.raw.copy_(torch.randint(0, 256, (layout.nbytes,), generator=g, dtype=torch.uint8))
    return pool


def clone_pool(pool: BlockPool) -> BlockPool:
    ref = BlockPool.create(pool.layout)
    ref.backing.raw.copy_(pool.backing.raw)
    return ref


def random_tensor_source(T: int, seed: int) -> TensorSource:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randint(-(1 << 15), 1 << 15, (T, HIDDEN), generator=g, dtype=torch.int16).view(torch.bfloat16)
    fill = torch.randint(0, 1 << 30, (T,), generator=g, dtype=torch.int32)
    mrope = torch.randint(0, 1 << 20, (3, T), generator=g, dtype=torch.int32)
    return TensorSource(emb, fill, mrope, mrope_delta=-7)


@pytest.fixture
def pair():
    """(language transport, encoder transport); both closed afterwards."""
    lang = MooncakeTransport("tcp", "", "127.0.0.1")
    enc = MooncakeTransport("tcp", "", "127.0.0.1")
    try:
        yield lang, enc
    finally:
        enc.close()
        lang.close()


def run_request(enc, peer, src, total, dst_pool, ref_pool, alloc_blocks, rng):
    """Send ``total`` tokens chunk by chunk as the protocol would: every chunk
    gets freshly 'allocated' destination blocks (non-contiguous, with a
    contiguous run now and then); aux only with the first chunk."""
    sent = 0
    first = True
    chunks = 0
    while True:
        perm = torch.randperm(LAYOUT.num_blocks, generator=rng).tolist()
        dst_blocks = perm[:alloc_blocks]
        if chunks % 2 == 1:       # a contiguous run exercises coalescing
            s0 = perm[0] % (LAYOUT.num_blocks - alloc_blocks)
            dst_blocks = list(range(s0, s0 + alloc_blocks))
        plan = plan_chunk(total, sent, len(dst_blocks) * BS, BS, dst_blocks)
        aux = make_aux(total, src.mrope_delta, LAYOUT.aux_ints) if first else None
        before_aux = dst_pool.aux.clone()
        enc.write_chunk(peer, src, plan, aux)
        kcpu.scatter_chunk(ref_pool, plan.dst_blocks, src, plan.src_block_start, plan.tokens, aux)
        if aux is None:
            assert torch.equal(dst_pool.aux, before_aux), "aux written although not given"
        else:
            assert dst_pool.aux[plan.dst_blocks[0], 0].item() == total
            assert dst_pool.aux[plan.dst_blocks[0], 1].item() == src.mrope_delta
        assert torch.equal(dst_pool.backing.raw, ref_pool.backing.raw), f"pool differs after chunk {chunks}"
        chunks += 1
        first = False
        sent = plan.sent_tokens_after
        if not plan.partial:
            return chunks


# ------------------------------------------------------------------ data
@pytest.mark.parametrize("tensor_mode", ["register", "stage", "auto"])
@pytest.mark.parametrize("total", [1, BS, 3 * BS, 5 * BS + 7, 11 * BS + 1])
def test_tensor_source_multi_chunk_bit_exact(pair, tensor_mode, total):
    lang, enc = pair
    enc.tensor_mode = tensor_mode
    dst = garbage_pool(LAYOUT, seed=1)
    ref = clone_pool(dst)
    peer = enc.open_peer(lang.export_pool(dst))
    src = random_tensor_source(total, seed=total)
    rng = torch.Generator().manual_seed(total)
    chunks = run_request(enc, peer, src, total, dst, ref, alloc_blocks=3, rng=rng)
    assert chunks == max(1, -(-total // (3 * BS)))
    # a second request into the same pool, one big chunk
    run_request(enc, peer, random_tensor_source(total, seed=99), total, dst, ref, alloc_blocks=12, rng=rng)
    enc.close_peer(peer)
    lang.unexport_pool(dst)


@pytest.mark.parametrize("total", [1, 2 * BS, 4 * BS + 5, 9 * BS + 15])
def test_block_source_multi_chunk_bit_exact(pair, total):
    lang, enc = pair
    src_pool = garbage_pool(LAYOUT, seed=7)
    enc.register_source_pool(src_pool)
    enc.register_source_pool(src_pool)          # idempotent
    nsrc = -(-total // BS)
    src_blocks = torch.randperm(LAYOUT.num_blocks, generator=torch.Generator().manual_seed(3)).tolist()[:nsrc]
    src = BlockSource(src_pool, src_blocks, total, mrope_delta=5)
    dst = garbage_pool(LAYOUT, seed=2)
    ref = clone_pool(dst)
    peer = enc.open_peer(lang.export_pool(dst))
    run_request(enc, peer, src, total, dst, ref, alloc_blocks=2, rng=torch.Generator().manual_seed(total))
    # contiguous source and destination blocks coalesce into few ranges
    src2 = BlockSource(src_pool, list(range(nsrc)), total)
    plan = plan_chunk(total, 0, nsrc * BS, BS, list(range(10, 10 + nsrc)))
    with peer.engine.lock:
        S, D, N, transient = enc.build_triples(peer, src2, plan, None)
    # emb, fill, mrope: one range each; a partial last block adds its mrope rows 1 and 2
    assert len(N) == (3 if total % BS == 0 else 5)
    assert sum(N) == total * (LAYOUT.emb_row_bytes + 4 + 12)
    assert not transient
    enc.write_chunk(peer, src2, plan, None)
    kcpu.scatter_chunk(ref, plan.dst_blocks, src2, 0, total, None)
    assert torch.equal(dst.backing.raw, ref.backing.raw)


def test_block_source_without_explicit_registration(pair):
    lang, enc = pair
    src_pool = garbage_pool(LAYOUT, seed=8)
    src = BlockSource(src_pool, [4, 2], 20)
    dst = garbage_pool(LAYOUT, seed=9)
    ref = clone_pool(dst)
    peer = enc.open_peer(lang.export_pool(dst))
    plan = plan_chunk(20, 0, 2 * BS, BS, [7, 8])
    enc.write_chunk(peer, src, plan, make_aux(20, 0, LAYOUT.aux_ints))
    kcpu.scatter_chunk(ref, [7, 8], src, 0, 20, make_aux(20, 0, LAYOUT.aux_ints))
    assert torch.equal(dst.backing.raw, ref.backing.raw)


def test_tensor_source_overlapping_registered_memory_falls_back_to_staging(pair):
    """Embeddings that are a view of a registered pool cannot be registered
    again (Mooncake rejects overlapping regions): they are staged instead."""
    lang, enc = pair
    enc.tensor_mode = "register"
    src_pool = garbage_pool(LAYOUT, seed=10)
    enc.register_source_pool(src_pool)
    T = 2 * BS + 3
    emb = src_pool.embeddings.view(-1, HIDDEN)[5:5 + T]
    src = TensorSource(emb, torch.arange(T, dtype=torch.int32), torch.arange(3 * T, dtype=torch.int32).view(3, T))
    dst = garbage_pool(LAYOUT, seed=11)
    ref = clone_pool(dst)
    peer = enc.open_peer(lang.export_pool(dst))
    plan = plan_chunk(T, 0, 3 * BS, BS, [30, 1, 17])
    enc.write_chunk(peer, src, plan, None)
    kcpu.scatter_chunk(ref, plan.dst_blocks, src, 0, T, None)
    assert torch.equal(dst.backing.raw, ref.backing.raw)


def test_two_peers_one_encoder(pair):
    """Two language pools (one per 'rank'); every rank gets a full copy."""
    lang, enc = pair
    lang2 = MooncakeTransport("tcp", "", "127.0.0.1")
    try:
        dsts = [garbage_pool(LAYOUT, seed=20), garbage_pool(LAYOUT, seed=21)]
        refs = [clone_pool(d) for d in dsts]
        peers = [enc.open_peer(lang.export_pool(dsts[0])), enc.open_peer(lang2.export_pool(dsts[1]))]
        assert peers[0].session != peers[1].session
        assert peers[0].engine is not peers[1].engine        # one engine per peer session
        src = random_tensor_source(4 * BS + 1, seed=5)
        for p, d, r in zip(peers, dsts, refs):
            run_request(enc, p, src, src.total_tokens, d, r, alloc_blocks=2, rng=torch.Generator().manual_seed(1))
        # a second pool of the same session shares the session's engine
        d3 = garbage_pool(LAYOUT, seed=22)
        p3 = enc.open_peer(lang.export_pool(d3))
        assert p3.engine is peers[0].engine
        enc.close_peer(p3)
        run_request(enc, peers[0], src, src.total_tokens, dsts[0], refs[0], alloc_blocks=5,
                    rng=torch.Generator().manual_seed(2))
    finally:
        lang2.close()


def test_engines_are_recycled(pair):
    lang, enc = pair
    dst = garbage_pool(LAYOUT, seed=30)
    desc = lang.export_pool(dst)
    enc.close_peer(enc.open_peer(desc))
    created = mc.mooncake_diagnostics()["engines_created"]
    for _ in range(3):
        peer = enc.open_peer(desc)
        src = random_tensor_source(BS + 1, seed=1)
        enc.write_chunk(peer, src, plan_chunk(BS + 1, 0, 2 * BS, BS, [0, 1]), None)
        enc.close_peer(peer)
        enc.close_peer(peer)      # idempotent
    assert mc.mooncake_diagnostics()["engines_created"] == created


# ------------------------------------------------------------------ descriptions
def _desc(pair):
    lang, _ = pair
    dst = garbage_pool(LAYOUT, seed=40)
    return lang.export_pool(dst), dst


def test_desc_is_json_and_complete(pair):
    import json

    desc, dst = _desc(pair)
    assert json.loads(json.dumps(desc)) == desc
    assert desc["base"] == dst.data_ptr() and desc["nbytes"] == LAYOUT.nbytes
    assert desc["layout"] == LAYOUT.to_dict()
    host, port = mc.parse_session(desc["session"])
    assert host == "127.0.0.1" and port > 0
    for key in ("emb_offset", "fill_offset", "mrope_offset", "aux_offset", "emb_block_bytes"):
        assert desc[key] == getattr(LAYOUT, key)


BAD = [
    ("not a dict", lambda d: [d]),
    ("wrong transport", lambda d: {**d, "transport": "shm"}),
    ("wrong version", lambda d: {**d, "version": 99}),
    ("wrong protocol", lambda d: {**d, "protocol": "rdma"}),
    ("missing session", lambda d: {k: v for k, v in d.items() if k != "session"}),
    ("session without port", lambda d: {**d, "session": "127.0.0.1"}),
    ("session port 0", lambda d: {**d, "session": "127.0.0.1:0"}),
    ("session port too big", lambda d: {**d, "session": "127.0.0.1:70000"}),
    ("session port text", lambda d: {**d, "session": "127.0.0.1:http"}),
    ("session int", lambda d: {**d, "session": 5}),
    ("base str", lambda d: {**d, "base": str(d["base"])}),
    ("base float", lambda d: {**d, "base": float(d["base"])}),
    ("base bool", lambda d: {**d, "base": True}),
    ("base zero", lambda d: {**d, "base": 0}),
    ("base negative", lambda d: {**d, "base": -4096}),
    ("base overflow", lambda d: {**d, "base": (1 << 64) - 10}),
    ("nbytes too small", lambda d: {**d, "nbytes": d["nbytes"] - 1}),
    ("missing nbytes", lambda d: {k: v for k, v in d.items() if k != "nbytes"}),
    ("missing layout", lambda d: {k: v for k, v in d.items() if k != "layout"}),
    ("bad layout", lambda d: {**d, "layout": {**d["layout"], "block_size": -1}}),
    ("bad dtype", lambda d: {**d, "layout": {**d["layout"], "dtype": "int8"}}),
    ("layout vs offsets", lambda d: {**d, "layout": {**d["layout"], "num_blocks": d["layout"]["num_blocks"] // 2}}),
    ("offset tampered", lambda d: {**d, "aux_offset": d["aux_offset"] + 4096}),
    ("offset missing", lambda d: {k: v for k, v in d.items() if k != "mrope_offset"}),
]


@pytest.mark.parametrize("why,mutate", BAD, ids=[b[0] for b in BAD])
def test_bad_desc_rejected(pair, why, mutate):
    _, enc = pair
    desc, _ = _desc(pair)
    with pytest.raises(mc.MooncakeDescError) as ei:
        enc.open_peer(mutate(desc))
    assert isinstance(ei.value, TransferError) and isinstance(ei.value, ValueError)
    assert "ooncake" in str(ei.value) or "layout" in str(ei.value)


def test_bad_plans_rejected(pair):
    lang, enc = pair
    desc, dst = _desc(pair)
    peer = enc.open_peer(desc)
    src = random_tensor_source(3 * BS, seed=1)
    with pytest.raises(TransferError, match="out of range"):
        enc.write_chunk(peer, src, plan_chunk(3 * BS, 0, 2 * BS, BS, [0, LAYOUT.num_blocks]), None)
    with pytest.raises(TransferError, match="exceeds"):
        enc.write_chunk(peer, random_tensor_source(BS, seed=1), plan_chunk(3 * BS, 0, 3 * BS, BS, [0, 1, 2]), None)
    other = BlockLayout(8, BS, HIDDEN * 2, torch.bfloat16)
    wide = TensorSource(torch.zeros(BS, HIDDEN * 2, dtype=torch.bfloat16), torch.zeros(BS, dtype=torch.int32),
                        torch.zeros(3, BS, dtype=torch.int32))
    assert other.hidden != LAYOUT.hidden
    with pytest.raises(TransferError, match="peer pool holds"):
        enc.write_chunk(peer, wide, plan_chunk(BS, 0, BS, BS, [0]), None)
    with pytest.raises(TransferError, match="aux"):
        enc.write_chunk(peer, src, plan_chunk(3 * BS, 0, 3 * BS, BS, [0, 1, 2]), torch.zeros(99, dtype=torch.int32))
    with pytest.raises(TransferError, match="TensorSource or BlockSource"):
        enc.write_chunk(peer, object(), plan_chunk(3 * BS, 0, 3 * BS, BS, [0, 1, 2]), None)


def test_bad_constructor_arguments():
    from embresume.errors import ConfigError

    for kw in ({"protocol": "foo"}, {"local_host": "0.0.0.0"}, {"local_host": ""}, {"tensor_mode": "x"},
               {"write_timeout": 0}, {"log_level": "LOUD"}):
        with pytest.raises(ConfigError):
            MooncakeTransport(**kw)


# ------------------------------------------------------------------ failures
def _one_chunk():
    src = random_tensor_source(BS, seed=3)
    return src, plan_chunk(BS, 0, BS, BS, [0])


def test_write_to_closed_transport_fails_fast(pair):
    lang, enc = pair
    desc, dst = _desc(pair)
    peer = enc.open_peer(desc)
    src, plan = _one_chunk()
    enc.write_chunk(peer, src, plan, None)          # first contact while alive
    lang.close()
    t = time.monotonic()
    with pytest.raises(TransferError, match="do not reuse"):
        enc.write_chunk(peer, src, plan, None)
    assert time.monotonic() - t < 5


def test_write_to_closed_transport_before_first_contact(pair):
    lang, enc = pair
    desc, dst = _desc(pair)
    lang.close()
    peer = enc.open_peer(desc)
    src, plan = _one_chunk()
    t = time.monotonic()
    with pytest.raises(TransferError):
        enc.write_chunk(peer, src, plan, None)
    assert time.monotonic() - t < 5


def test_write_to_wrong_port_fails_fast(pair):
    lang, enc = pair
    desc, dst = _desc(pair)
    port = free_port()
    assert not mc.probe_peer(f"127.0.0.1:{port}", timeout=1.0)
    assert mc.probe_peer(desc["session"], timeout=1.0)
    peer = enc.open_peer({**desc, "session": f"127.0.0.1:{port}"})
    assert not enc.probe(peer, timeout=2.0)
    src, plan = _one_chunk()
    t = time.monotonic()
    with pytest.raises(TransferError):
        enc.write_chunk(peer, src, plan, None)
    assert time.monotonic() - t < 5


def test_write_after_close_raises(pair):
    lang, enc = pair
    desc, dst = _desc(pair)
    peer = enc.open_peer(desc)
    assert enc.probe(peer, timeout=5.0)
    src, plan = _one_chunk()
    enc.close_peer(peer)
    with pytest.raises(TransferError, match="closed"):
        enc.write_chunk(peer, src, plan, None)
    enc.close()
    with pytest.raises(TransferError, match="closed"):
        enc.open_peer(desc)


class SilentServer:
    """Accepts TCP connections and never answers (a wedged peer)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
                self.conns.append(c)
            except OSError:
                continue

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for c in self.conns:          # closing makes Mooncake's pending handshake fail at once
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self.sock.close()


def test_silent_peer_does_not_stall_other_peers(pair):
    """A write to a peer that accepts TCP and never answers blocks (Mooncake,
    ~60 s) -- but only that peer's engine: a healthy peer is written meanwhile."""
    lang, enc = pair
    silent = SilentServer()
    desc, dst = _desc(pair)
    hung_peer = enc.open_peer({**desc, "session": f"127.0.0.1:{silent.port}"})
    good_peer = enc.open_peer(desc)
    assert hung_peer.engine is not good_peer.engine
    src, plan = _one_chunk()
    result: dict = {}

    def hung_write():
        try:
            enc.write_chunk(hung_peer, src, plan, None)
            result["ok"] = True
        except TransferError as e:
            result["err"] = e

    th = threading.Thread(target=hung_write, daemon=True)
    try:
        th.start()
        time.sleep(0.5)
        assert th.is_alive(), "expected the write to the silent peer to block"
        t = time.monotonic()
        ref = clone_pool(dst)
        enc.write_chunk(good_peer, src, plan, None)
        kcpu.scatter_chunk(ref, plan.dst_blocks, src, 0, BS, None)
        assert time.monotonic() - t < 5
        assert torch.equal(dst.backing.raw, ref.backing.raw)
    finally:
        silent.close()
        th.join(30)
    assert not th.is_alive()
    assert "err" in result


def test_write_timeout_and_probe_mark_silent_peer_broken(pair):
    lang, enc = pair
    silent = SilentServer()
    try:
        desc, dst = _desc(pair)
        enc.write_timeout = 1.0
        peer = enc.open_peer({**desc, "session": f"127.0.0.1:{silent.port}"})
        assert mc.probe_peer(peer.session, timeout=1.0)     # TCP accepts ...
        src, plan = _one_chunk()
        t = time.monotonic()
        with pytest.raises(TransferError, match="did not return within"):
            enc.write_chunk(peer, src, plan, None)
        assert time.monotonic() - t < 4
        t = time.monotonic()
        with pytest.raises(TransferError, match="unusable"):
            enc.write_chunk(peer, src, plan, None)
        assert time.monotonic() - t < 0.5
        live = mc.mooncake_diagnostics()["engines_live"]
        enc.close_peer(peer)
        # a broken engine is never recycled nor released: it stays counted
        assert mc.mooncake_diagnostics()["engines_live"] == live
        assert peer.engine.te is not None

        peer2 = enc.open_peer({**desc, "session": f"127.0.0.1:{silent.port}"})
        assert peer2.engine is not peer.engine               # a broken engine is not reused
        t = time.monotonic()
        assert not enc.probe(peer2, timeout=0.5)             # ... but Mooncake never answers
        assert time.monotonic() - t < 2
        with pytest.raises(TransferError, match="unusable"):
            enc.write_chunk(peer2, src, plan, None)
        # a healthy peer still works with the deadline on
        good = enc.open_peer(desc)
        assert enc.probe(good, timeout=5.0)
        ref = clone_pool(dst)
        enc.write_chunk(good, src, plan, make_aux(BS, 0, LAYOUT.aux_ints))
        kcpu.scatter_chunk(ref, plan.dst_blocks, src, 0, BS, make_aux(BS, 0, LAYOUT.aux_ints))
        assert torch.equal(dst.backing.raw, ref.backing.raw)
    finally:
        silent.close()


# ------------------------------------------------------------------ diagnostics
def test_diagnostics_and_rdma_fallback_notice(caplog, monkeypatch):
    d = mc.mooncake_diagnostics()
    assert d["available"] is True
    assert d["log_level"] in mc.LOG_LEVELS
    assert isinstance(d["rdma_devices"], list) and "security" in d
    if mc.rdma_devices():
        pytest.skip("this host has RDMA devices; the fallback notice does not apply")
    assert "falls back to TCP" in d["rdma_note"]
    monkeypatch.setattr(mc, "_rdma_warned", False)
    with caplog.at_level(logging.WARNING, logger="embresume.transport.mooncake"):
        t = MooncakeTransport("rdma", "", "127.0.0.1")
        t.close()
        MooncakeTransport("rdma", "", "127.0.0.1").close()
    notes = [r for r in caplog.records if "falls back to TCP" in r.getMessage()]
    assert len(notes) == 1


@pytest.mark.parametrize("tensor_mode", ["register", "stage"])
def test_tensor_modes_register_or_stage(pair, tensor_mode):
    """``register`` registers the chunk's embedding rows in place for the
    write only; ``stage`` copies them into the peer's registered staging."""
    lang, enc = pair
    enc.tensor_mode = tensor_mode
    dst = garbage_pool(LAYOUT, seed=50)
    peer = enc.open_peer(lang.export_pool(dst))
    src = random_tensor_source(3 * BS, seed=4)
    plan = plan_chunk(3 * BS, 0, 3 * BS, BS, [5, 6, 7])
    e_addr = src.embeddings.data_ptr()
    with peer.engine.lock:
        S, D, N, transient = enc.build_triples(peer, src, plan, None)
        if tensor_mode == "register":
            assert transient == [e_addr] and S[0] == e_addr
        else:
            assert transient == [] and S[0] == peer.emb.addr
        for a in transient:
            peer.engine.unregister(a)
    assert len(N) == 3                          # contiguous blocks: emb, fill, mrope
    enc.write_chunk(peer, src, plan, None)
    assert e_addr not in peer.engine.regs       # transient registration dropped
    ref = garbage_pool(LAYOUT, seed=50)
    kcpu.scatter_chunk(ref, plan.dst_blocks, src, 0, 3 * BS, None)
    assert torch.equal(dst.backing.raw, ref.backing.raw)


def test_strided_tensor_source_and_peer_close(pair):
    """fill_ids / mrope that are views with strides (not contiguous) are staged correctly."""
    lang, enc = pair
    T = 2 * BS + 9
    big_fill = torch.arange(2 * T, dtype=torch.int32)
    big_mrope = torch.arange(6 * T, dtype=torch.int32).view(3, 2 * T)
    src = TensorSource(random_tensor_source(T, seed=12).embeddings, big_fill[::2], big_mrope[:, ::2])
    assert not src.fill_ids.is_contiguous() and not src.mrope_positions.is_contiguous()
    dst = garbage_pool(LAYOUT, seed=13)
    ref = clone_pool(dst)
    peer = enc.open_peer(lang.export_pool(dst))
    plan = plan_chunk(T, 0, 3 * BS, BS, [9, 3, 4])
    aux = make_aux(T, 3, LAYOUT.aux_ints)[:4].clone()    # a short aux record writes only its ints
    enc.write_chunk(peer, src, plan, aux)
    kcpu.scatter_chunk(ref, plan.dst_blocks, src, 0, T, aux)
    assert torch.equal(dst.backing.raw, ref.backing.raw)
    peer.close()
    assert peer.closed
    with pytest.raises(TransferError, match="closed"):
        enc.write_chunk(peer, src, plan, None)


def test_from_config():
    from embresume.config import Config

    cfg = Config(hidden_size=HIDDEN, mooncake_protocol="tcp", mooncake_host="127.0.0.1")
    t = MooncakeTransport.from_config(cfg)
    try:
        assert (t.protocol, t.device_names, t.local_host) == ("tcp", "", "127.0.0.1")
        assert t.name == "mooncake"
    finally:
        t.close()


# ------------------------------------------------------------------ engine bounds
ENGINE_THREADS = 3      # measured: 2 once initialised, a 3rd after its first transfer


def _threads() -> int:
    """Threads of this process, native ones included (Mooncake's)."""
    return len(os.listdir("/proc/self/task"))


def _listening() -> int:
    """TCP sockets in LISTEN state owned by this process (/proc/net/tcp{,6}
    rows whose inode is one of our file descriptors)."""
    inodes = {link[8:-1] for _, link in fd_links("socket:[")}
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.readlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and cols[9] in inodes:
                n += 1
    return n


def _diag(key: str) -> int:
    return mc.mooncake_diagnostics()[key]


def _session_desc(desc: dict, i: int) -> dict:
    """The same exported pool under a distinct peer session: the export engine
    listens on all interfaces, so every 127.0.x.y address reaches it."""
    port = mc.parse_session(desc["session"])[1]
    return {**desc, "session": f"127.0.{1 + i // 200}.{2 + i % 200}:{port}"}


def test_open_peer_beyond_engine_bound_fails_and_leaks_nothing(pair):
    lang, _ = pair
    dst = garbage_pool(LAYOUT, seed=60)
    desc = lang.export_pool(dst)
    live0 = _diag("engines_live")
    enc = MooncakeTransport("tcp", "", "127.0.0.1", max_engines=live0 + 3)
    try:
        assert enc.engine_limit == live0 + 3
        peers = [enc.open_peer(_session_desc(desc, i)) for i in range(3)]
        assert len({p.engine for p in peers}) == 3
        assert _diag("engines_live") == live0 + 3
        created, threads, listening = _diag("engines_created"), _threads(), _listening()
        for attempt in range(3):                        # refused every time, nothing created
            with pytest.raises(mc.MooncakeEngineLimitError) as ei:
                enc.open_peer(_session_desc(desc, 3 + attempt))
            msg = str(ei.value)
            assert isinstance(ei.value, TransferError)
            assert f"the limit is {live0 + 3}" in msg
            assert "max_engines" in msg and "mooncake_max_engines" in msg
        assert _diag("engines_created") == created
        assert _diag("engines_live") == live0 + 3
        assert (_threads(), _listening()) == (threads, listening)
        assert len(enc._sessions) == 3 and len(enc._peers) == 3
        # a session already open reuses its engine at the bound, counted once
        again = enc.open_peer(_session_desc(desc, 1))
        assert again.engine is peers[1].engine
        assert _diag("engines_live") == live0 + 3
        src, plan = _one_chunk()
        enc.write_chunk(again, src, plan, None)
        # closing a session frees its slot
        enc.close_peer(peers[0])
        assert _diag("engines_live") == live0 + 2
        extra = enc.open_peer(_session_desc(desc, 9))
        assert _diag("engines_live") == live0 + 3
        enc.write_chunk(extra, src, plan, None)
    finally:
        enc.close()
    assert _diag("engines_live") == live0
    assert mc._wait_released(30)


def test_engine_bound_from_config_and_validation():
    from embresume.config import Config
    from embresume.errors import ConfigError

    cfg = Config(hidden_size=HIDDEN, mooncake_protocol="tcp", mooncake_host="127.0.0.1",
                 extra={"mooncake_max_engines": 5})
    t = MooncakeTransport.create(cfg, "127.0.0.1")
    try:
        assert t.max_engines == 5 and t.engine_limit == 5
    finally:
        t.close()
    t = MooncakeTransport("tcp", "", "127.0.0.1")
    try:
        assert t.max_engines is None and t.engine_limit == mc.MAX_PEER_ENGINES
    finally:
        t.close()
    for bad in (0, -1, True, 2.5, "many"):
        with pytest.raises(ConfigError, match="max_engines"):
            MooncakeTransport("tcp", "", "127.0.0.1", max_engines=bad)


def test_idle_engines_beyond_bound_are_released(pair):
    """Ten peer sessions open, write and close: two engines stay idle for
    reuse, the others are released in the background -- their threads and
    listening ports go away -- without stalling Python threads."""
    if mc._engine_free_fn() is None:
        pytest.skip("this Mooncake build exports no freeEngine: idle engines are kept")
    lang, enc = pair
    dst = garbage_pool(LAYOUT, seed=61)
    desc = lang.export_pool(dst)
    src, plan = _one_chunk()
    warm = enc.open_peer(_session_desc(desc, 50))       # one-time threads (the export side's) first
    enc.write_chunk(warm, src, plan, None)
    enc.close_peer(warm)
    assert mc._wait_released(30)
    N = 10
    idle0, released0 = _diag("engines_idle"), _diag("engines_released")
    assert idle0 <= mc.MAX_IDLE_ENGINES
    threads0, listening0 = _threads(), _listening()

    peers = []
    for i in range(N):
        p = enc.open_peer(_session_desc(desc, 100 + i))
        enc.write_chunk(p, src, plan, None)
        peers.append(p)
    assert len({p.engine for p in peers}) == N
    new = N - idle0                                     # engines created for this test
    assert _listening() >= listening0 + 2 * new         # each engine: 2 listening ports ...
    assert _threads() >= threads0 + 2 * new             # ... and 2 threads

    gaps = [0.0]
    stop = threading.Event()

    def ticker():
        last = time.monotonic()
        while not stop.is_set():
            time.sleep(0.002)
            now = time.monotonic()
            gaps[0] = max(gaps[0], now - last)
            last = now

    tick = threading.Thread(target=ticker, daemon=True)
    tick.start()
    try:
        t = time.monotonic()
        for p in peers:
            enc.close_peer(p)
        assert time.monotonic() - t < 0.5, "close_peer must not wait for engine releases"
        t = time.monotonic()
        assert mc._wait_released(30), "engine releases did not finish in 30 s"
        waited = time.monotonic() - t
    finally:
        stop.set()
        tick.join(5)
    assert waited > 0.3                                 # a release really ran (~1 s each) ...
    assert gaps[0] < 0.8, f"Python threads stalled {gaps[0]:.2f} s during releases"   # ... without the GIL

    assert _diag("engines_idle") == mc.MAX_IDLE_ENGINES
    assert _diag("engines_released") - released0 == N - mc.MAX_IDLE_ENGINES
    extra_idle = mc.MAX_IDLE_ENGINES - idle0            # engines kept that were not idle at the start
    deadline = time.monotonic() + 10                    # threads exit right after the join; allow a moment
    while time.monotonic() < deadline and _threads() > threads0 + ENGINE_THREADS * extra_idle:
        time.sleep(0.05)
    assert _listening() <= listening0 + 2 * extra_idle
    assert _threads() <= threads0 + ENGINE_THREADS * extra_idle
    # the kept engines are reused: no engine created for the next peers
    created = _diag("engines_created")
    again = [enc.open_peer(_session_desc(desc, 200 + i)) for i in range(mc.MAX_IDLE_ENGINES)]
    for p in again:
        enc.write_chunk(p, src, plan, None)
        enc.close_peer(p)
    assert _diag("engines_created") == created


def test_same_session_twice_shares_one_engine(pair):
    lang, enc = pair
    dst, dst2 = garbage_pool(LAYOUT, seed=62), garbage_pool(LAYOUT, seed=63)
    desc, desc2 = lang.export_pool(dst), lang.export_pool(dst2)
    assert desc["session"] == desc2["session"]
    live0, created0 = _diag("engines_live"), _diag("engines_created")
    listening0 = _listening()
    p1 = enc.open_peer(desc)
    p2 = enc.open_peer(desc2)
    p3 = enc.open_peer(desc)                            # the very same description again
    assert p1.engine is p2.engine is p3.engine
    assert p1.engine.refs == 3 and len(enc._sessions) == 1
    assert _diag("engines_live") == live0 + 1
    assert _diag("engines_created") - created0 <= 1
    assert _listening() - listening0 <= 2
    src, plan = _one_chunk()
    enc.close_peer(p1)
    enc.close_peer(p3)
    assert _diag("engines_live") == live0 + 1           # still p2's
    ref = clone_pool(dst2)
    enc.write_chunk(p2, src, plan, None)
    kcpu.scatter_chunk(ref, plan.dst_blocks, src, 0, BS, None)
    assert torch.equal(dst2.backing.raw, ref.backing.raw)
    enc.close_peer(p2)
    assert _diag("engines_live") == live0
    assert p2.engine.retired and p2.engine.te is None   # kept idle or released, no longer p2's
    with pytest.raises(TransferError, match="closed"):
        enc.write_chunk(p2, src, plan, None)
