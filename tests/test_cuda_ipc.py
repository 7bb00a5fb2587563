"""CUDA IPC pools, the handle cache and the cuda_ipc transport.

The handle cache, the description checks and the "CUDA IPC is unavailable"
decisions run everywhere (the cache with an injected opener).  Everything that
needs a GPU is marked ``gpu`` and skipped without a CUDA GPU and CuPy; the
two-process tests use the ``spawn`` context, bound every wait by a timeout and
always join/terminate the child.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import json
import random
import traceback

import pytest
import torch

from embresume.blocks import BlockAllocator, BlockLayout, BlockPool, TorchBacking
from embresume.errors import TransferError
from embresume.ipc import cuda_ipc
from embresume.ipc.cuda_ipc import (CudaBacking, CudaIpcUnavailable, IpcHandleCache, check_ipc_possible,
                                    parse_desc, process_identity)
from embresume.transport.cuda_ipc import CudaIpcTransport
from embresume.planner import plan_chunk
from embresume.source import BlockSource, TensorSource, make_aux
from conftest import gpu_skip_reason


CUDA_SKIP = gpu_skip_reason()

LAYOUT = BlockLayout(num_blocks=4, block_size=16, hidden=8, dtype=torch.bfloat16)


def fake_desc(**over):
    """A description as another process on this host would export it."""
    me = process_identity()
    d = {"kind": "cuda_ipc", "version": 1, "handle": "ab" * 64, "offset": 0, "size": LAYOUT.nbytes,
         "device": 0, "pci_bus_id": None, "generation": 1, "pid": me["pid"] + 1, "proc_token": "0" * 16,
         "pidns": me["pidns"], "boot_id": me["boot_id"], "layout": LAYOUT.to_dict()}
    d.update(over)
    return d


# ---------------------------------------------------------------------------
# everywhere
# ---------------------------------------------------------------------------
class FakeDriver:
    def __init__(self):
        self.opened, self.closed = [], []
        self._next = 0x7f0000000000

    def open(self, handle, device):
        self.opened.append((handle, device))
        self._next += 1 << 30
        return self._next

    def close(self, ptr, device):
        self.closed.append((ptr, device))


def test_cache_opens_each_handle_once_and_closes_with_the_last_user():
    drv = FakeDriver()
    cache = IpcHandleCache(drv.open, drv.close)
    d = fake_desc()
    p1 = cache.open(d, 0)
    p2 = cache.open(dict(d), 0)             # an equal description: same entry
    assert p1 == p2 and cache.opens == 1 and len(drv.opened) == 1
    assert drv.opened[0] == (bytes.fromhex(d["handle"]), 0)
    key = cache.key_of(d)
    assert key == (d["pid"], d["handle"], 1) and cache.refs(key) == 2
    cache.release(key)
    assert drv.closed == [] and key in cache
    cache.release(key)
    assert drv.closed == [(p1, 0)] and key not in cache and cache.closes == 1
    cache.release(key)                      # a stray release is harmless
    assert cache.closes == 1


def test_cache_keys_by_pid_handle_and_generation():
    drv = FakeDriver()
    cache = IpcHandleCache(drv.open, drv.close)
    a = cache.open(fake_desc(), 0)
    b = cache.open(fake_desc(handle="cd" * 64), 0)
    c = cache.open(fake_desc(pid=fake_desc()["pid"] + 5), 0)
    assert len({a, b, c}) == 3 and cache.opens == 3
    # the same peer re-created its pool: a new generation is a new mapping,
    # and the old generation, once unused, is closed
    old = cache.key_of(fake_desc())
    cache.release(old)
    cache.open(fake_desc(generation=2), 0)
    assert cache.opens == 4
    assert old not in cache
    # disconnect of a peer process closes all its mappings
    n = cache.close_pid(fake_desc()["pid"])
    assert n == 2 and len(cache) == 1
    cache.close_all()
    assert len(cache) == 0 and len(drv.closed) == 4


def test_cache_open_refused_keeps_nothing():
    def refuse(handle, device):
        raise CudaIpcUnavailable("refused")
    cache = IpcHandleCache(refuse, lambda p, d: None)
    with pytest.raises(CudaIpcUnavailable):
        cache.open(fake_desc(), 0)
    assert len(cache) == 0 and cache.opens == 0


def test_same_process_and_namespace_detection():
    me = process_identity()
    with pytest.raises(CudaIpcUnavailable, match="same process"):
        check_ipc_possible(fake_desc(pid=me["pid"], proc_token=me["proc_token"]))
    with pytest.raises(CudaIpcUnavailable, match="PID namespace"):
        check_ipc_possible(fake_desc(pidns="pid:[1]" if me["pidns"] != "pid:[1]" else "pid:[2]"))
    if me["boot_id"]:
        with pytest.raises(CudaIpcUnavailable, match="another host"):
            check_ipc_possible(fake_desc(boot_id="00000000-0000-0000-0000-000000000000"))
    check_ipc_possible(fake_desc())                       # another process on this host: fine
    # same pid number but another token (a pid reused after the exporter died): not "same process"
    check_ipc_possible(fake_desc(pid=me["pid"], proc_token="f" * 16))


def test_parse_desc_rejects_bad_descriptions():
    layout, handle, off, size = parse_desc(fake_desc())
    assert layout == LAYOUT and len(handle) == 64 and off == 0 and size == LAYOUT.nbytes
    with pytest.raises(TransferError):
        parse_desc(fake_desc(kind="shm"))
    with pytest.raises(TransferError):
        parse_desc(fake_desc(version=2))
    with pytest.raises(TransferError):
        parse_desc(fake_desc(handle="ab" * 10))
    with pytest.raises(TransferError):
        parse_desc(fake_desc(handle="zz" * 64))
    with pytest.raises(TransferError):
        parse_desc(fake_desc(size=LAYOUT.nbytes - 1))
    with pytest.raises(TransferError):
        parse_desc({k: v for k, v in fake_desc().items() if k != "generation"})


def test_open_peer_raises_the_fallback_exception_when_ipc_cannot_work():
    """Without CUDA/CuPy (here), or with a handle the driver refuses (on a
    GPU), open_peer raises CudaIpcUnavailable and leaves CUDA usable."""
    d = fake_desc()
    if CUDA_SKIP is None:
        import cupy
        d["pci_bus_id"] = cupy.cuda.runtime.deviceGetPCIBusId(torch.cuda.current_device())
        d["device"] = torch.cuda.current_device()
    t = CudaIpcTransport(cache=IpcHandleCache())
    with pytest.raises(CudaIpcUnavailable):
        t.open_peer(d)
    assert len(t.cache) == 0
    if CUDA_SKIP is None:
        # a refused open must not leave a stale error for torch's next launch check
        x = torch.ones(1024, device="cuda") * 3
        torch.cuda.synchronize()
        assert x.sum().item() == 3072


def test_export_needs_a_cuda_backing():
    pool = BlockPool.create(LAYOUT)
    with pytest.raises(TransferError, match="CudaBacking"):
        CudaIpcTransport().export_pool(pool)


@pytest.mark.skipif(CUDA_SKIP is None, reason="checks the no-GPU behaviour")
def test_cuda_backing_without_gpu_says_why():
    with pytest.raises(CudaIpcUnavailable):
        CudaBacking(4096)
    assert CudaIpcTransport.name == "cuda_ipc"


# ---------------------------------------------------------------------------
# GPU: helpers shared by both processes
# ---------------------------------------------------------------------------
def make_source(kind, T, H, dtype, bs, seed, device):
    """The same embedding in every process (CPU generator), on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    isz = torch.empty((), dtype=dtype).element_size()
    e = torch.randint(0, 256, (T * H * isz,), dtype=torch.uint8, generator=gen).view(dtype).view(T, H)
    f = torch.randint(-2**31, 2**31 - 1, (T,), dtype=torch.int32, generator=gen)
    m = torch.randint(-2**31, 2**31 - 1, (3, T), dtype=torch.int32, generator=gen)
    if kind == "tensor":
        return TensorSource(e.to(device), f.to(device), m.to(device), mrope_delta=-5), (e, f, m)
    nb = -(-T // bs)
    L = BlockLayout(nb + 2, bs, H, dtype)
    pool = BlockPool(L, TorchBacking(L.nbytes, device))
    blocks = list(range(nb + 2))
    random.Random(seed).shuffle(blocks)
    blocks = blocks[:nb]
    for j, b in enumerate(blocks):
        n = min(bs, T - j * bs)
        pool.embeddings[b, :n] = e[j * bs:j * bs + n].to(device)
        pool.fill_ids[b, :n] = f[j * bs:j * bs + n].to(device)
        pool.mrope[b, :, :n] = m[:, j * bs:j * bs + n].to(device)
    return BlockSource(pool, blocks, T, mrope_delta=-5), (e, f, m)


def _recv(conn, timeout, what):
    if not conn.poll(timeout):
        raise TimeoutError(f"no {what} message within {timeout} s")
    msg = conn.recv()
    if msg[0] == "error":
        raise AssertionError(f"the other process failed:\n{msg[1]}")
    return msg


def _encoder_main(conn, kind, T, H, dtype_name, bs, seed):
    """The encoder process: open the peer pool once, write every chunk asked for."""
    try:
        from embresume.blocks import dtype_from_name
        dtype = dtype_from_name(dtype_name)
        torch.cuda.set_device(0)
        _, desc = _recv(conn, 120, "desc")
        transport = CudaIpcTransport()
        cache = transport.cache
        peer = transport.open_peer(desc)
        again = transport.open_peer(desc)              # a second user of the same pool
        info = {"opens": cache.opens, "same_ptr": again.pool.data_ptr() == peer.pool.data_ptr(),
                "refs": cache.refs(peer.key)}
        transport.close_peer(again)
        info["refs_after_close"] = cache.refs(peer.key)
        info["closes_after_close"] = cache.closes
        src, _ = make_source(kind, T, H, dtype, bs, seed, "cuda")
        conn.send(("opened", info))
        while True:
            msg = _recv(conn, 120, "chunk")
            if msg[0] == "close":
                break
            _, dst_blocks, allocated, sent = msg
            plan = plan_chunk(T, sent, allocated, bs, dst_blocks)
            aux = make_aux(T, -5, peer.layout.aux_ints).cuda() if sent == 0 else None
            transport.write_chunk(peer, src, plan, aux)
            conn.send(("written", plan.tokens, plan.partial, plan.sent_tokens_after))
        transport.close_peer(peer)
        info = {"closes": cache.closes, "entries": len(cache)}
        transport.close()
        conn.send(("done", info))
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass


def _stop(proc):
    proc.join(timeout=30)
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout=10)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout=10)


# ---------------------------------------------------------------------------
# GPU tests
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind,H,dtype,bs,T", [
    ("tensor", 1024, torch.bfloat16, 128, 128 * 9 + 17),
    ("blocks", 1024, torch.bfloat16, 128, 128 * 7 + 1),
    ("tensor", 4099, torch.float16, 16, 16 * 13 + 5),      # odd row bytes: the 2-byte path
])
@pytest.mark.gpu
@pytest.mark.skipif(CUDA_SKIP is not None, reason=CUDA_SKIP or "")
def test_two_processes_multi_resume_bit_exact(kind, H, dtype, bs, T):
    from embresume.blocks import dtype_name
    from embresume.kernels import gather_chunk

    seed = 1234 + H
    layout = BlockLayout(num_blocks=5, block_size=bs, hidden=H, dtype=dtype)
    pool = CudaBacking.create_pool(layout)
    transport = CudaIpcTransport()
    desc = transport.export_pool(pool)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_encoder_main, args=(child, kind, T, H, dtype_name(dtype), bs, seed), daemon=True)
    proc.start()
    try:
        child.close()
        parent.send(("desc", desc))
        _, info = _recv(parent, 180, "opened")
        assert info == {"opens": 1, "same_ptr": True, "refs": 2, "refs_after_close": 1, "closes_after_close": 0}
        alloc = BlockAllocator(layout.num_blocks, bs)
        me = torch.zeros(T, H, dtype=dtype, device="cuda")
        mf = torch.zeros(T, dtype=torch.int32, device="cuda")
        mm = torch.zeros(3, T, dtype=torch.int32, device="cuda")
        rnd = random.Random(seed)
        sent, chunks, aux = 0, 0, None
        while True:
            k = rnd.randint(1, layout.num_blocks)
            blocks = alloc.allocate(k * bs, room=1)
            rnd.shuffle(blocks)
            parent.send(("chunk", blocks, len(blocks) * bs, sent))
            _, tokens, partial, after = _recv(parent, 60, "written")
            gather_chunk(pool, blocks, tokens, me, mf, mm, sent)
            if sent == 0:
                aux = pool.aux[blocks[0], :2].tolist()
            torch.cuda.synchronize()
            alloc.free(blocks, 1)
            sent, chunks = after, chunks + 1
            if not partial:
                break
        parent.send(("close",))
        _, done = _recv(parent, 60, "done")
        assert done == {"closes": 1, "entries": 0}
        assert chunks >= 2 and sent == T
        assert aux == [T, -5]
        _, (e, f, m) = make_source(kind, T, H, dtype, bs, seed, "cpu")
        assert torch.equal(me.cpu().view(torch.uint8), e.view(torch.uint8))
        assert torch.equal(mf.cpu(), f)
        assert torch.equal(mm.cpu(), m)
    finally:
        _stop(proc)
        parent.close()
        transport.unexport_pool(pool)
        pool.close()
    assert proc.exitcode == 0


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_SKIP is not None, reason=CUDA_SKIP or "")
def test_same_process_open_is_detected():
    layout = BlockLayout(num_blocks=4, block_size=8, hidden=64, dtype=torch.bfloat16)
    pool = CudaBacking.create_pool(layout)
    t = CudaIpcTransport(cache=IpcHandleCache())
    desc = t.export_pool(pool)
    try:
        with pytest.raises(CudaIpcUnavailable, match="same process"):
            t.open_peer(desc)
        assert len(t.cache) == 0
        # the explicit in-process fallback writes straight into the pool
        t2 = CudaIpcTransport(allow_same_process=True, cache=IpcHandleCache())
        peer = t2.open_peer(desc)
        assert peer.same_process and peer.pool.data_ptr() == pool.data_ptr()
        src, (e, f, m) = make_source("tensor", 20, 64, torch.bfloat16, 8, 7, "cuda")
        plan = plan_chunk(20, 0, 16, 8, [3, 0])                 # partial: 16 of 20 tokens
        assert plan.partial
        t2.write_chunk(peer, src, plan, make_aux(20, -5, layout.aux_ints))
        host_src, _ = make_source("tensor", 20, 64, torch.bfloat16, 8, 7, "cpu")
        plan2 = plan_chunk(20, 16, 8, 8, [2])                   # the resume, from a host source
        assert not plan2.partial
        t2.write_chunk(peer, host_src, plan2, None)
        got = torch.cat([pool.embeddings[3], pool.embeddings[0], pool.embeddings[2, :4]]).cpu()
        assert torch.equal(got.view(torch.uint8), e.view(torch.uint8))
        assert torch.equal(torch.cat([pool.fill_ids[3], pool.fill_ids[0], pool.fill_ids[2, :4]]).cpu(), f)
        assert torch.equal(torch.cat([pool.mrope[3], pool.mrope[0], pool.mrope[2, :, :4]], dim=1).cpu(), m)
        assert pool.aux[3, :2].tolist() == [20, -5]
        t2.close()
    finally:
        pool.close()


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_SKIP is not None, reason=CUDA_SKIP or "")
def test_cuda_backing_is_one_direct_allocation():
    layout = BlockLayout(num_blocks=8, block_size=128, hidden=512, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    b1 = CudaBacking(layout.nbytes)
    b2 = CudaBacking(layout.nbytes)
    try:
        assert torch.cuda.memory_allocated() == before        # not torch's caching allocator
        assert b1.raw.data_ptr() == b1.ptr and b1.raw.numel() == layout.nbytes and b1.raw.is_cuda
        assert b1.raw.device == torch.device("cuda", torch.cuda.current_device())
        assert int(b1.raw.sum().item()) == 0                   # zeroed
        h1, h2 = b1.ipc_handle(), b2.ipc_handle()
        assert len(h1) == 64 and h1 != h2
        assert b2.generation > b1.generation
        pool = BlockPool(layout, b1)
        desc = CudaIpcTransport().export_pool(pool)
        assert desc["handle"] == h1.hex() and desc["size"] == layout.nbytes and desc["pid"] == os.getpid()
        assert json.loads(json.dumps(desc)) == desc
    finally:
        b1.close()
        b2.close()

