"""Block scatter/gather kernels.

Three (four) backends run the same tests and must agree bit for bit:

* ``cpu``: :mod:`embresume.kernels.cpu`, the reference, checked here against an
  independent per-token oracle;
* ``emulated`` / ``emulated-rev``: the CUDA C source of
  :mod:`embresume.kernels.cuda` compiled as host C++ (g++) with a tiny shim
  that runs every CTA and thread sequentially (forwards, and backwards to catch
  order dependence), fed with the very descriptors ``plan_scatter`` /
  ``plan_gather`` build.  This checks the kernel's index math, alignment
  branches and the host descriptor code on any machine with a C++ compiler;
* ``cuda``: the real CuPy kernel through the dispatcher (``@pytest.mark.gpu``;
  skipped without a CUDA GPU and CuPy).

Every comparison is of raw bytes (whole pool backings, so a stray write
anywhere in a pool fails), with pools pre-filled with random garbage.
"""

from __future__ import annotations

import ctypes
import random
import shutil
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import embresume.kernels as kernels
from embresume.blocks import BlockLayout, BlockPool, TorchBacking
from embresume.kernels import cpu as kcpu
from embresume.kernels import cuda as kcuda
from embresume.planner import plan_chunk
from embresume.source import BlockSource, TensorSource, make_aux
from conftest import gpu_skip_reason

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
HIDDENS = [1, 2, 3, 5, 8, 63, 64, 127, 1000, 4096, 4099]


CUDA_SKIP = gpu_skip_reason()


# ---------------------------------------------------------------------------
# the host-C++ emulator of the CUDA kernel
# ---------------------------------------------------------------------------
_SHIM = r"""
struct embr_dim3 { unsigned int x, y, z; };
static embr_dim3 blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
"""

_DRIVER = r"""
extern "C" void embr_emulate(long long grid, int threads, const long long* desc, int nrec, int emb_ctas,
                             long long aux_dst, long long aux_src, long long aux_n, int reverse)
{
    blockDim.x = threads; gridDim.x = (unsigned int)grid;
    for (long long bi = 0; bi < grid; ++bi) {
        blockIdx.x = (unsigned int)(reverse ? grid - 1 - bi : bi);
        for (int ti = 0; ti < threads; ++ti) {
            threadIdx.x = (unsigned int)(reverse ? threads - 1 - ti : ti);
            embr_block_copy(desc, nrec, emb_ctas, aux_dst, aux_src, aux_n);
        }
    }
}
"""


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the host emulation of the CUDA kernel")
    d = tmp_path_factory.mktemp("kernel_emu")
    src = d / "emu.cpp"
    src.write_text(_SHIM + kcuda.KERNEL_SOURCE + _DRIVER)
    lib = d / "libemu.so"
    subprocess.run([cxx, "-std=c++14", "-O1", "-fno-strict-aliasing", "-shared", "-fPIC", "-o", str(lib), str(src)],
                   check=True, capture_output=True, timeout=120)
    so = ctypes.CDLL(str(lib))
    so.embr_emulate.restype = None
    so.embr_emulate.argtypes = [ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                ctypes.c_longlong, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_int]
    return so


def emulate(so, launch: kcuda.Launch, reverse: bool) -> None:
    if launch is None or launch.grid == 0:
        return
    desc = np.ascontiguousarray(launch.desc, dtype=np.int64)
    ptr = desc.ctypes.data
    so.embr_emulate(launch.grid, kcuda.THREADS, ptr, launch.nrec, launch.emb_ctas, launch.aux_dst,
                    launch.aux_src_for(ptr) if launch.aux_n else 0, launch.aux_n, int(reverse))


# ---------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------
class Backend:
    def __init__(self, name, device, emu=None):
        self.name = name
        self.device = device
        self._emu = emu

    def scatter(self, dst, dst_blocks, src, src_block0, n, aux=None):
        if self.name == "cpu":
            kcpu.scatter_chunk(dst, dst_blocks, src, src_block0, n, aux)
        elif self.name.startswith("emulated"):
            emulate(self._emu, kcuda.plan_scatter(dst, dst_blocks, src, src_block0, n, aux),
                    self.name.endswith("rev"))
        else:
            kernels.scatter_chunk(dst, dst_blocks, src, src_block0, n, aux)
            torch.cuda.synchronize()

    def gather(self, pool, blocks, n, oe, of, om, o0):
        if self.name == "cpu":
            kcpu.gather_chunk(pool, blocks, n, oe, of, om, o0)
        elif self.name.startswith("emulated"):
            bs = pool.layout.block_size
            tot = int(sum(min(bs, n - j * bs) for j in range(min(len(blocks), -(-n // bs))))) if n > 0 else 0
            if tot:
                emulate(self._emu, kcuda.plan_gather(pool, blocks, n, oe[o0:o0 + tot], of[o0:o0 + tot],
                                                     om[:, o0:o0 + tot]), self.name.endswith("rev"))
        else:
            kernels.gather_chunk(pool, blocks, n, oe, of, om, o0)
            torch.cuda.synchronize()


BACKENDS = [
    "cpu",
    "emulated",
    "emulated-rev",
    pytest.param("cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=BACKENDS, scope="module")
def backend(request):
    name = request.param
    if name == "cuda":
        if CUDA_SKIP:
            pytest.skip(CUDA_SKIP)
        return Backend("cuda", "cuda")
    if name.startswith("emulated"):
        return Backend(name, "cpu", request.getfixturevalue("emulator"))
    return Backend("cpu", "cpu")


# ---------------------------------------------------------------------------
# data helpers
# ---------------------------------------------------------------------------
def rand_bytes(n, gen):
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)


def make_pool(layout, gen, device="cpu"):
    """A pool full of random garbage (so untouched bytes are checkable)."""
    pool = BlockPool(layout, TorchBacking(layout.nbytes, "cpu"))
    pool.backing.raw.copy_(rand_bytes(layout.nbytes, gen))
    return pool


def clone_pool(pool, device="cpu"):
    backing = TorchBacking(pool.layout.nbytes, device)
    backing.raw.copy_(pool.backing.raw)
    return BlockPool(pool.layout, backing)


def pool_bytes(pool):
    return pool.backing.raw.cpu()


def rand_emb(T, H, dtype, gen):
    isz = torch.empty((), dtype=dtype).element_size()
    return rand_bytes(T * H * isz, gen).view(dtype).view(T, H)


def rand_i32(shape, gen):
    return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, generator=gen)


def make_tensor_source(T, H, dtype, gen, strided_mrope=False):
    e = rand_emb(T, H, dtype, gen)
    f = rand_i32((T,), gen)
    if strided_mrope:
        m = rand_i32((T, 3), gen).t()          # [3, T] with token stride 3
    else:
        m = rand_i32((3, T), gen)
    return TensorSource(e, f, m, mrope_delta=-7)


def source_to(src, device):
    if device == "cpu":
        return src
    if isinstance(src, TensorSource):
        return TensorSource(src.embeddings.to(device), src.fill_ids.to(device), src.mrope_positions.to(device),
                            src.mrope_delta)
    return BlockSource(clone_pool(src.pool, device), list(src.blocks), src.total_tokens, src.mrope_delta)


def make_block_source(T, layout_like, gen, extra_blocks=3):
    bs = layout_like.block_size
    nb = -(-T // bs) + extra_blocks
    L = BlockLayout(nb, bs, layout_like.hidden, layout_like.dtype, layout_like.aux_ints)
    pool = make_pool(L, gen)
    blocks = list(range(nb))
    random.Random(T * 31 + nb).shuffle(blocks)
    return BlockSource(pool, blocks[: -(-T // bs) + 1], T, mrope_delta=3)


def token_rows(src, src_block0, bs, i):
    """Oracle view of chunk token i (independent of block_rows)."""
    if isinstance(src, TensorSource):
        t = src_block0 * bs + i
        return src.embeddings[t], src.fill_ids[t], src.mrope_positions[:, t]
    b = src.blocks[src_block0 + i // bs]
    p = src.pool
    return p.embeddings[b, i % bs], p.fill_ids[b, i % bs], p.mrope[b, :, i % bs]


def oracle_scatter(dst, dst_blocks, src, src_block0, n, aux=None):
    bs = dst.layout.block_size
    for i in range(max(n, 0)):
        j = i // bs
        if j >= len(dst_blocks):
            break
        db, r = dst_blocks[j], i % bs
        e, f, m = token_rows(src, src_block0, bs, i)
        dst.embeddings[db, r] = e
        dst.fill_ids[db, r] = f
        dst.mrope[db, :, r] = m
    if aux is not None:
        for k in range(aux.numel()):
            dst.aux[dst_blocks[0], k] = aux.reshape(-1)[k]


def run_scatter_case(backend, layout, dst_blocks, src, src_block0, n, aux, gen, monkeypatch=None):
    """Reference (cpu), oracle and backend on identical garbage pools: all equal."""
    base = make_pool(layout, gen)
    ref = clone_pool(base)
    kcpu.scatter_chunk(ref, dst_blocks, src, src_block0, n, aux)
    orc = clone_pool(base)
    oracle_scatter(orc, dst_blocks, src, src_block0, n, aux)
    assert torch.equal(pool_bytes(ref), pool_bytes(orc)), "cpu reference disagrees with the oracle"
    got = clone_pool(base, backend.device)
    bsrc = source_to(src, backend.device)
    baux = aux.to(backend.device) if (aux is not None and backend.name == "cuda") else aux
    if backend.name == "cuda" and monkeypatch is not None:
        # same dtype, no overlap: the fused kernel must run, not the torch fallback
        def boom(*a, **k):
            raise AssertionError("the CUDA path fell back to the torch reference")
        monkeypatch.setattr(kcuda.cpu, "scatter_chunk", boom)
    backend.scatter(got, dst_blocks, bsrc, src_block0, n, baux)
    if monkeypatch is not None:
        monkeypatch.undo()
    assert torch.equal(pool_bytes(got), pool_bytes(ref)), f"{backend.name} differs from the cpu reference"
    # and something really was written (unless nothing was asked)
    if n > 0 and len(dst_blocks):
        assert not torch.equal(pool_bytes(got), pool_bytes(base))
    return ref


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("hidden", HIDDENS)
@pytest.mark.parametrize("kind", ["tensor", "blocks"])
def test_scatter_random_blocks_partial_last(backend, dtype, hidden, kind, monkeypatch):
    gen = torch.Generator().manual_seed(hidden * 7 + len(kind) + DTYPES.index(dtype))
    bs = 8
    L = BlockLayout(num_blocks=12, block_size=bs, hidden=hidden, dtype=dtype, aux_ints=16)
    T = 5 * bs + 3                         # the chunk's last block is partial
    src = make_tensor_source(T, hidden, dtype, gen) if kind == "tensor" else make_block_source(T, L, gen)
    dst_blocks = random.Random(hidden).sample(range(L.num_blocks), 6)
    aux = make_aux(T, -7, L.aux_ints)
    run_scatter_case(backend, L, dst_blocks, src, 0, T, aux, gen, monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_scatter_resume_chunk_offsets_and_strided_mrope(backend, dtype):
    """A resume chunk (src_block0 > 0) from a source whose mrope has token stride 3."""
    gen = torch.Generator().manual_seed(11)
    L = BlockLayout(num_blocks=9, block_size=16, hidden=96, dtype=dtype)
    T = 16 * 7 + 5
    src = make_tensor_source(T, 96, dtype, gen, strided_mrope=True)
    assert src.mrope_positions.stride() == (1, 3)
    dst_blocks = [8, 2, 5, 0]
    run_scatter_case(backend, L, dst_blocks, src, 4, T - 4 * 16, None, gen)   # 3 blocks, last partial


def test_aux_only_in_first_block(backend):
    gen = torch.Generator().manual_seed(5)
    L = BlockLayout(num_blocks=10, block_size=4, hidden=12, dtype=torch.bfloat16, aux_ints=8)
    src = make_tensor_source(30, 12, torch.bfloat16, gen)
    dst_blocks = [7, 1, 4, 9]
    aux = make_aux(30, 5, 6)                # fewer ints than the record holds
    ref = run_scatter_case(backend, L, dst_blocks, src, 0, 16, aux, gen)
    assert ref.aux[7, :6].tolist() == [30, 5, 0, 0, 0, 0]
    # the resume chunk carries no aux (rule 3): aux records stay as they were
    base = make_pool(L, gen)
    got = clone_pool(base, backend.device)
    backend.scatter(got, [3, 6], source_to(src, backend.device), 4, 8, None)
    before = base.aux.clone()
    after = got.aux.cpu()
    assert torch.equal(after, before)


def test_zero_tokens_writes_only_aux(backend):
    gen = torch.Generator().manual_seed(6)
    L = BlockLayout(num_blocks=4, block_size=4, hidden=8, dtype=torch.float16)
    src = make_tensor_source(8, 8, torch.float16, gen)
    run_scatter_case(backend, L, [2, 3], src, 0, 0, make_aux(8, 1, L.aux_ints), gen)


def test_fewer_dst_blocks_than_tokens(backend):
    """Too few blocks for the tokens is an error on every backend, never a silent cut."""
    gen = torch.Generator().manual_seed(7)
    L = BlockLayout(num_blocks=6, block_size=4, hidden=10, dtype=torch.float32)
    src = make_tensor_source(40, 10, torch.float32, gen)
    base = make_pool(L, gen)
    got = clone_pool(base, backend.device)
    with pytest.raises(ValueError, match="need"):
        backend.scatter(got, [5, 0], source_to(src, backend.device), 1, 20, None)
    assert torch.equal(pool_bytes(got), pool_bytes(base))


def test_duplicate_dst_block_last_write_wins(backend):
    gen = torch.Generator().manual_seed(8)
    L = BlockLayout(num_blocks=6, block_size=4, hidden=33, dtype=torch.bfloat16)
    src = make_tensor_source(20, 33, torch.bfloat16, gen)
    run_scatter_case(backend, L, [1, 4, 1, 2, 4], src, 0, 19, None, gen)


def test_scatter_rejects_bad_indices(backend):
    gen = torch.Generator().manual_seed(9)
    L = BlockLayout(num_blocks=4, block_size=4, hidden=8, dtype=torch.bfloat16)
    src = source_to(make_tensor_source(10, 8, torch.bfloat16, gen), backend.device)
    pool = clone_pool(make_pool(L, gen), backend.device)
    with pytest.raises((IndexError, RuntimeError)):
        backend.scatter(pool, [0, 4], src, 0, 8)              # block 4 of 4
    with pytest.raises((IndexError, RuntimeError, ValueError)):
        backend.scatter(pool, [0, 1, 2], src, 0, 12)          # source has 10 tokens


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("hidden", [1, 3, 64, 4099])
def test_gather_is_exact_inverse_of_scatter(backend, dtype, hidden):
    gen = torch.Generator().manual_seed(hidden + 100 * DTYPES.index(dtype))
    bs = 8
    L = BlockLayout(num_blocks=10, block_size=bs, hidden=hidden, dtype=dtype)
    T = 4 * bs + 5
    src = make_tensor_source(T, hidden, dtype, gen)
    dst_blocks = random.Random(hidden).sample(range(10), 5)
    dev = backend.device
    pool = clone_pool(make_pool(L, gen), dev)
    backend.scatter(pool, dst_blocks, source_to(src, dev), 0, T, None)
    o0 = 3
    N = T + 7
    oe = rand_emb(N, hidden, dtype, gen)
    of = rand_i32((N,), gen)
    om = rand_i32((3, N), gen)
    exp_e, exp_f, exp_m = oe.clone(), of.clone(), om.clone()
    exp_e[o0:o0 + T], exp_f[o0:o0 + T], exp_m[:, o0:o0 + T] = src.embeddings, src.fill_ids, src.mrope_positions
    ge, gf, gm = oe.to(dev), of.to(dev), om.to(dev)
    backend.gather(pool, dst_blocks, T, ge, gf, gm, o0)

    def raw(t):
        return t.cpu().contiguous().view(torch.uint8)
    assert torch.equal(raw(ge), raw(exp_e))
    assert torch.equal(raw(gf), raw(exp_f))
    assert torch.equal(raw(gm), raw(exp_m))


@pytest.mark.parametrize("kind", ["tensor", "blocks"])
def test_multi_resume_roundtrip(backend, kind):
    """Chunks planned by plan_chunk into a small pool whose blocks are reused
    between chunks; merging the gathered chunks restores the source exactly."""
    gen = torch.Generator().manual_seed(12)
    bs, H, dt = 16, 200, torch.bfloat16
    L = BlockLayout(num_blocks=5, block_size=bs, hidden=H, dtype=dt)
    T = 16 * 11 + 9
    src = make_tensor_source(T, H, dt, gen) if kind == "tensor" else make_block_source(T, L, gen)
    dev = backend.device
    bsrc = source_to(src, dev)
    pool = clone_pool(make_pool(L, gen), dev)
    rnd = random.Random(3)
    me = torch.zeros(T, H, dtype=dt, device=dev)
    mf = torch.zeros(T, dtype=torch.int32, device=dev)
    mm = torch.zeros(3, T, dtype=torch.int32, device=dev)
    sent, chunks, aux_seen = 0, 0, None
    while True:
        blocks = rnd.sample(range(L.num_blocks), rnd.randint(1, L.num_blocks))
        plan = plan_chunk(T, sent, len(blocks) * bs, bs, blocks)
        aux = make_aux(T, 9, L.aux_ints) if sent == 0 else None
        if aux is not None and dev == "cuda":
            aux = aux.to(dev)
        backend.scatter(pool, plan.dst_blocks, bsrc, plan.src_block_start, plan.tokens, aux)
        if sent == 0:
            aux_seen = pool.aux[plan.dst_blocks[0], :2].cpu().tolist()
        backend.gather(pool, plan.dst_blocks, plan.tokens, me, mf, mm, sent)
        sent = plan.sent_tokens_after
        chunks += 1
        if not plan.partial:
            break
    assert chunks >= 3
    assert aux_seen == [T, 9]
    exp = make_exp(src, T, bs)
    assert torch.equal(me.cpu().view(torch.uint8), exp[0].contiguous().view(torch.uint8))
    assert torch.equal(mf.cpu(), exp[1])
    assert torch.equal(mm.cpu(), exp[2])


def make_exp(src, T, bs):
    if isinstance(src, TensorSource):
        return src.embeddings, src.fill_ids, src.mrope_positions
    p = src.pool
    rows = [(src.blocks[i // bs], i % bs) for i in range(T)]
    e = torch.stack([p.embeddings[b, r] for b, r in rows])
    f = torch.stack([p.fill_ids[b, r] for b, r in rows])
    m = torch.stack([p.mrope[b, :, r] for b, r in rows], dim=1)
    return e, f, m


# -- geometry, by hypothesis -------------------------------------------------
@st.composite
def geometries(draw):
    bs = draw(st.integers(1, 9))
    hidden = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(DTYPES))
    num_blocks = draw(st.integers(1, 8))
    nd = draw(st.integers(1, num_blocks))
    dst_blocks = draw(st.permutations(range(num_blocks)))[:nd]
    src_block0 = draw(st.integers(0, 3))
    n = draw(st.integers(0, nd * bs))               # never more than the blocks hold (that raises)
    kind = draw(st.sampled_from(["tensor", "blocks", "tensor-strided"]))
    with_aux = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return bs, hidden, dtype, num_blocks, dst_blocks, src_block0, n, kind, with_aux, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(g=geometries())
def test_geometry_property(backend, g):
    bs, hidden, dtype, num_blocks, dst_blocks, src_block0, n, kind, with_aux, seed = g
    gen = torch.Generator().manual_seed(seed)
    L = BlockLayout(num_blocks, bs, hidden, dtype, aux_ints=4)
    T = (src_block0 + len(dst_blocks) + 1) * bs      # the source holds every token the chunk can ask for
    if kind == "blocks":
        src = make_block_source(T, L, gen)
    else:
        src = make_tensor_source(T, hidden, dtype, gen, strided_mrope=(kind == "tensor-strided"))
    aux = make_aux(T, 2, 4)[: 1 + seed % 4] if with_aux else None
    run_scatter_case(backend, L, dst_blocks, src, src_block0, n, aux, gen)
    # gather back what was written, into garbage outputs
    written = min(max(n, 0), len(dst_blocks) * bs)
    if written:
        dev = backend.device
        pool = clone_pool(make_pool(L, gen), dev)
        backend.scatter(pool, dst_blocks, source_to(src, dev), src_block0, n, None)
        oe = rand_emb(written + 2, hidden, dtype, gen)
        of = rand_i32((written + 2,), gen)
        om = rand_i32((3, written + 2), gen)
        ge, gf, gm = oe.to(dev), of.to(dev), om.to(dev)
        backend.gather(pool, dst_blocks, n, ge, gf, gm, 1)
        for i in range(written):
            e, f, m = token_rows(src, src_block0, bs, i)
            assert torch.equal(ge[1 + i].cpu().view(torch.uint8), e.contiguous().view(torch.uint8))
            assert gf[1 + i].item() == f.item()
            assert torch.equal(gm[:, 1 + i].cpu(), m)
        assert torch.equal(ge[0].cpu().view(torch.uint8), oe[0].view(torch.uint8))
        assert torch.equal(ge[-1].cpu().view(torch.uint8), oe[-1].view(torch.uint8))
        assert gf[0].item() == of[0].item() and gf[-1].item() == of[-1].item()


# -- the byte-span primitive, every alignment branch -----------------------------
def _span_launch(dst_ptr, src_ptr, n):
    desc = np.zeros(kcuda.NFIELDS, dtype=np.int64)
    desc[0], desc[1], desc[2] = dst_ptr, src_ptr, n
    return kcuda.Launch(desc, 1, kcuda._emb_ctas(n))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doff=st.integers(0, 40), soff=st.integers(0, 40), n=st.integers(0, 70000), seed=st.integers(0, 1000))
def test_byte_span_all_alignments(backend, doff, soff, n, seed):
    """One span at arbitrary byte offsets: exactly [doff, doff + n) changes."""
    if backend.name == "cpu":
        pytest.skip("the span primitive exists only in the kernel")
    gen = torch.Generator().manual_seed(seed)
    size = 70100
    src = rand_bytes(size, gen).to(backend.device)
    dst0 = rand_bytes(size, gen)
    dst = dst0.to(backend.device)
    launch = _span_launch(dst.data_ptr() + doff, src.data_ptr() + soff, n)
    if backend.name == "cuda":
        kcuda.run_launch(launch, dst.device.index or 0)
        torch.cuda.synchronize()
    else:
        emulate(backend._emu, launch, backend.name.endswith("rev"))
    exp = dst0.clone()
    exp[doff:doff + n] = src.cpu()[soff:soff + n]
    assert torch.equal(dst.cpu(), exp)


# -- the CUDA wrapper's other paths (conversions, non-contiguous outputs) ----------
@pytest.mark.gpu
@pytest.mark.skipif(CUDA_SKIP is not None, reason=CUDA_SKIP or "")
def test_cuda_conversion_and_out_of_place_paths():
    gen = torch.Generator().manual_seed(21)
    L = BlockLayout(num_blocks=6, block_size=8, hidden=24, dtype=torch.bfloat16)
    src = make_tensor_source(30, 24, torch.float32, gen)       # another dtype: torch reference path
    base = make_pool(L, gen)
    ref = clone_pool(base)
    kcpu.scatter_chunk(ref, [4, 0, 2, 5], src, 0, 30, make_aux(30, 0, 16))
    got = clone_pool(base, "cuda")
    kernels.scatter_chunk(got, [4, 0, 2, 5], source_to(src, "cuda"), 0, 30, make_aux(30, 0, 16))
    torch.cuda.synchronize()
    assert torch.equal(pool_bytes(got), pool_bytes(ref))
    # a CPU source into a GPU pool (staged) and a source on the GPU with CPU aux
    src16 = make_tensor_source(30, 24, torch.bfloat16, gen)
    ref2, got2 = clone_pool(base), clone_pool(base, "cuda")
    kcpu.scatter_chunk(ref2, [1, 3], src16, 1, 16, make_aux(30, 4, 16))
    kernels.scatter_chunk(got2, [1, 3], src16, 1, 16, make_aux(30, 4, 16))
    torch.cuda.synchronize()
    assert torch.equal(pool_bytes(got2), pool_bytes(ref2))
    # gather into float32 CPU outputs and a non-contiguous GPU mrope
    oe = torch.zeros(40, 24)
    of = torch.zeros(40, dtype=torch.int32)
    om_big = torch.zeros(40, 3, dtype=torch.int32, device="cuda").t()
    kernels.gather_chunk(got2, [1, 3], 16, oe, of, om_big, 2)
    torch.cuda.synchronize()
    re = torch.zeros(40, 24)
    rf = torch.zeros(40, dtype=torch.int32)
    rm = torch.zeros(3, 40, dtype=torch.int32)
    kcpu.gather_chunk(ref2, [1, 3], 16, re, rf, rm, 2)
    assert torch.equal(oe, re) and torch.equal(of, rf) and torch.equal(om_big.cpu(), rm)


def test_kernel_source_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    f = tmp_path / "k.cu"
    f.write_text(kcuda.KERNEL_SOURCE)
    ptx = tmp_path / "k.ptx"
    r = subprocess.run([nvcc, "-std=c++14", "-arch=sm_90", "-ptx", "-o", str(ptx), "-x", "cu", str(f)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    text = ptx.read_text()
    assert ".entry embr_block_copy" in text
    # the 16-byte path really is vectorised
    assert "ld.global.nc.v4.u32" in text and "st.global.v4.u32" in text


def test_cuda_module_imports_without_cupy():
    # importing is always fine; using it without CuPy/GPU says why
    assert isinstance(kcuda.KERNEL_SOURCE, str)
    reason = kcuda.unavailable_reason()
    if reason is not None:
        assert not kcuda.is_available()
        if not torch.cuda.is_available():
            assert "CUDA" in reason
