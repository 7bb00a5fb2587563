"""CuPy block scatter/gather kernels (same-host GPU path).

One RawModule kernel, ``embr_block_copy``, does every copy of a chunk in a
single launch.  The host builds one small int64 descriptor array, one record
per chunk block, with absolute byte addresses (so pools opened through CUDA
IPC, which are plain pointers wrapped as uint8 tensors, work like any other)::

    record r (11 x int64):
      0 emb_dst   1 emb_src   2 emb_bytes            rows * hidden * itemsize
      3 fill_dst  4 fill_src  5 fill_bytes           rows * 4
      6 m_dst     7 m_src     8 m_row_bytes          rows * 4, three rows (t/h/w)
      9 m_dst_stride          10 m_src_stride        bytes between the three rows

followed, when the aux record comes from host memory, by the aux ints packed
into int64 words.  The array is copied to the device in one H2D copy and the
kernel is launched once on the current torch stream of the launch device.

Grid: ``nrec * (emb_ctas + 1)`` CTAs (+1 when aux is written).  For record
``r`` the first ``emb_ctas`` CTAs split that record's embedding bytes between
them (a grid-stride loop over ``emb_ctas * THREADS`` threads, four 16-byte
loads in flight per thread); the last CTA of the record copies the fill ids
and the three mrope rows.  The extra final CTA copies the aux record.

Every span is copied as bytes (dtype-agnostic): with 16-byte vector loads and
stores when destination and source are congruent modulo 16 (a head of at most
15 single bytes aligns them, a tail of at most 15 bytes finishes), else with
the widest of 8/4/2/1-byte words they are congruent for.  So any hidden size,
any float dtype and partial last blocks are handled, with the vector path
whenever row bytes and pointers are 16-byte aligned.

The semantics are exactly those of :mod:`embresume.kernels.cpu` (that module
is the reference; the tests compare bit for bit).  Where the byte kernel
cannot express them (a source of another dtype, a source overlapping the
destination pool) the torch reference runs on the CUDA tensors instead.

The launch is asynchronous on the current stream, like a torch copy: callers
that hand the data to another process synchronise that stream first
(:class:`embresume.transport.cuda_ipc.CudaIpcTransport` does).  Sources that are not on a
GPU with access to the destination are staged by the caller
(:func:`embresume.source.stage_chunk`); unstaged, the torch reference copies them.

Importing this module needs neither CuPy nor a GPU; calling the kernels does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from embresume.kernels import cpu

KERNEL_NAME = "embr_block_copy"
THREADS = 256
#: bytes one CTA moves in one pass of the unrolled loop: THREADS x 16 B x 4
BYTES_PER_CTA = THREADS * 16 * 4
MAX_EMB_CTAS = 64
NFIELDS = 11

KERNEL_SOURCE = r"""
typedef long long i64;
typedef unsigned long long u64;
// 16-byte word (no dependence on the builtin vector types); loads and stores
// of it compile to ld.global.nc.v4.u32 / st.global.v4.u32
struct alignas(16) v16 { unsigned int x, y, z, w; };

// Copy n bytes from src to dst with the threads t = 0 .. nt-1 of a group
// (grid-stride).  Requires dst == src (mod sizeof(V)).  The head of at most
// sizeof(V)-1 bytes brings dst (and so src) to a multiple of sizeof(V); the
// body moves whole words of V, four in flight per thread; the tail moves the
// last (n - head) % sizeof(V) bytes.
template <typename V>
__device__ __forceinline__ void copy_span(char* __restrict__ dst, const char* __restrict__ src,
                                          i64 n, i64 t, i64 nt)
{
    const i64 W = (i64)sizeof(V);
    i64 head = (W - (i64)((u64)dst & (u64)(W - 1))) & (W - 1);
    if (head > n) head = n;
    for (i64 k = t; k < head; k += nt) dst[k] = src[k];
    const i64 nv = (n - head) / W;
    V* __restrict__ dv = reinterpret_cast<V*>(dst + head);
    const V* __restrict__ sv = reinterpret_cast<const V*>(src + head);
    i64 i = t;
    for (; i + 3 * nt < nv; i += 4 * nt) {
        const V a = sv[i];
        const V b = sv[i + nt];
        const V c = sv[i + 2 * nt];
        const V d = sv[i + 3 * nt];
        dv[i] = a;
        dv[i + nt] = b;
        dv[i + 2 * nt] = c;
        dv[i + 3 * nt] = d;
    }
    for (; i < nv; i += nt) dv[i] = sv[i];
    for (i64 k = head + nv * W + t; k < n; k += nt) dst[k] = src[k];
}

// Pick the widest word both addresses are congruent for.
__device__ __forceinline__ void copy_any(i64 dst, i64 src, i64 n, i64 t, i64 nt)
{
    if (n <= 0) return;
    char* d = reinterpret_cast<char*>(dst);
    const char* s = reinterpret_cast<const char*>(src);
    const u64 mis = (u64)dst ^ (u64)src;
    if ((mis & 15) == 0)      copy_span<v16>(d, s, n, t, nt);
    else if ((mis & 7) == 0)  copy_span<u64>(d, s, n, t, nt);
    else if ((mis & 3) == 0)  copy_span<unsigned int>(d, s, n, t, nt);
    else if ((mis & 1) == 0)  copy_span<unsigned short>(d, s, n, t, nt);
    else                      copy_span<unsigned char>(d, s, n, t, nt);
}

extern "C" __global__ void __launch_bounds__(256)
embr_block_copy(const i64* __restrict__ desc, int nrec, int emb_ctas,
                i64 aux_dst, i64 aux_src, i64 aux_n)
{
    const i64 per = (i64)emb_ctas + 1;
    const i64 b = (i64)blockIdx.x;
    const i64 tid = (i64)threadIdx.x;
    const i64 nthr = (i64)blockDim.x;
    if (b >= (i64)nrec * per) {            // the aux CTA (launched only when aux_n > 0)
        copy_any(aux_dst, aux_src, aux_n, tid, nthr);
        return;
    }
    const i64 r = b / per;
    const i64 part = b - r * per;
    const i64* d = desc + r * 11;
    if (part < emb_ctas) {                 // embeddings: emb_ctas CTAs share the span
        copy_any(d[0], d[1], d[2], part * nthr + tid, (i64)emb_ctas * nthr);
    } else {                               // fill ids and the three mrope rows
        copy_any(d[3], d[4], d[5], tid, nthr);
        for (int k = 0; k < 3; ++k)
            copy_any(d[6] + k * d[9], d[7] + k * d[10], d[8], tid, nthr);
    }
}
"""


class CudaUnavailable(RuntimeError):
    """CuPy or a CUDA device is missing."""


_cupy_mod = None
_cupy_err: Optional[str] = None
_lock = threading.Lock()
_module = None
_peer_cache: dict[tuple[int, int], bool] = {}


def _cupy():
    """Import CuPy lazily; raise :class:`CudaUnavailable` with the reason."""
    global _cupy_mod, _cupy_err
    if _cupy_mod is not None:
        return _cupy_mod
    if _cupy_err is None:
        try:
            import cupy  # noqa: F401
            _cupy_mod = cupy
            return cupy
        except Exception as e:  # ImportError, or a broken CUDA install
            _cupy_err = f"{type(e).__name__}: {e}"
    raise CudaUnavailable(f"the CUDA kernels need CuPy ({_cupy_err})")


def unavailable_reason() -> Optional[str]:
    """``None`` when the CUDA kernels can run here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    try:
        _cupy()
    except CudaUnavailable as e:
        return str(e)
    return None


def is_available() -> bool:
    return unavailable_reason() is None


def _kernel():
    """The compiled kernel (compiled once; CuPy keeps one binary per device)."""
    global _module
    cp = _cupy()
    with _lock:
        if _module is None:
            mod = cp.RawModule(code=KERNEL_SOURCE, options=("--std=c++14",))
            _module = (mod, mod.get_function(KERNEL_NAME))
        return _module[1]


def _can_access(dev: int, peer: int) -> bool:
    """Whether kernels on ``dev`` may touch memory of ``peer`` (enables it once)."""
    if dev == peer:
        return True
    key = (dev, peer)
    ok = _peer_cache.get(key)
    if ok is None:
        cp = _cupy()
        rt = cp.cuda.runtime
        ok = bool(rt.deviceCanAccessPeer(dev, peer))
        if ok:
            with cp.cuda.Device(dev):
                try:
                    rt.deviceEnablePeerAccess(peer)
                except rt.CUDARuntimeError as e:
                    # 704: cudaErrorPeerAccessAlreadyEnabled (torch may have done it)
                    if getattr(e, "status", None) != 704:
                        ok = False
        _peer_cache[key] = ok
    return ok


# ---------------------------------------------------------------------------
# launch descriptions (pure numpy/torch: no CuPy, testable anywhere)
# ---------------------------------------------------------------------------
@dataclass
class Launch:
    """One kernel launch: descriptor array plus scalar arguments."""

    desc: np.ndarray            # int64 [nrec * NFIELDS + aux words]
    nrec: int
    emb_ctas: int
    aux_dst: int = 0
    aux_src: Optional[int] = None   # absolute pointer; None: embedded at aux_word0
    aux_word0: int = 0
    aux_n: int = 0
    keep: list = field(default_factory=list)   # tensors the pointers refer to

    @property
    def grid(self) -> int:
        return self.nrec * (self.emb_ctas + 1) + (1 if self.aux_n > 0 else 0)

    def aux_src_for(self, desc_ptr: int) -> int:
        if self.aux_src is not None:
            return self.aux_src
        return desc_ptr + 8 * self.aux_word0


def _norm_blocks(blocks, n: int, num_blocks: int, what: str) -> np.ndarray:
    """The first ``n`` block ids as int64, negative ids wrapped like torch indexing."""
    try:
        arr = np.asarray([int(b) for b in list(blocks)[:n]], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise IndexError(f"{what} block ids must be integers") from None
    if arr.size and (arr.min() < -num_blocks or arr.max() >= num_blocks):
        bad = arr[(arr < -num_blocks) | (arr >= num_blocks)][0]
        raise IndexError(f"{what} block {int(bad)} is out of range for a pool of {num_blocks} blocks")
    return np.where(arr < 0, arr + num_blocks, arr)


def _chunk_rows(n_tokens: int, bs: int, avail_blocks: int) -> np.ndarray:
    """Rows per block exactly as the reference loop computes them."""
    need = -(-n_tokens // bs) if n_tokens > 0 else 0
    if need > avail_blocks:
        raise ValueError(f"{n_tokens} tokens need {need} blocks, {avail_blocks} given")
    nrec = need
    return np.minimum(bs, n_tokens - np.arange(nrec, dtype=np.int64) * bs)


def _emb_ctas(max_emb_bytes: int) -> int:
    return int(min(MAX_EMB_CTAS, max(1, -(-max_emb_bytes // BYTES_PER_CTA))))


def _records(nrec: int) -> np.ndarray:
    return np.empty((nrec, NFIELDS), dtype=np.int64)


def _aux_words(aux: torch.Tensor) -> np.ndarray:
    a = aux.detach().reshape(-1).to(torch.int32).numpy()
    b = a.tobytes()
    b += b"\0" * (-len(b) % 8)
    return np.frombuffer(b, dtype=np.int64)


def _attach_aux(launch: Launch, dst_pool, db0: int, aux: Optional[torch.Tensor]) -> Launch:
    if aux is None:
        return launch
    if isinstance(aux, np.ndarray):         # the endpoints' host aux record (source.aux_record)
        aux = torch.from_numpy(aux)
    L = dst_pool.layout
    k = aux.numel()
    if k > L.aux_ints:
        raise RuntimeError(f"aux record of {k} ints does not fit the pool's {L.aux_ints} aux ints")
    if k == 0:
        return launch
    launch.aux_dst = dst_pool.aux.data_ptr() + db0 * L.aux_ints * 4
    launch.aux_n = 4 * k
    if aux.is_cuda:
        a = aux.detach().reshape(-1).to(torch.int32).contiguous()
        launch.aux_src = a.data_ptr()
        launch.keep.append(a)
    else:
        words = _aux_words(aux)
        launch.aux_word0 = launch.desc.size
        launch.desc = np.concatenate([launch.desc, words])
    return launch


def plan_scatter(dst, dst_blocks: Sequence[int], src, src_block0: int, n_tokens: int,
                 aux: Optional[torch.Tensor] = None) -> Optional[Launch]:
    """Descriptors for :func:`scatter_chunk`.  ``src`` must already have the
    destination's hidden size and dtype.  Returns ``None`` when nothing is copied."""
    L = dst.layout
    bs = L.block_size
    dst_blocks = list(dst_blocks)
    rows = _chunk_rows(n_tokens, bs, len(dst_blocks))
    nrec = int(rows.size)
    dblk = _norm_blocks(dst_blocks, nrec, L.num_blocks, "destination")
    if aux is not None:
        if not dst_blocks:
            raise IndexError("an aux record needs at least one destination block")
        db0 = int(_norm_blocks(dst_blocks, 1, L.num_blocks, "destination")[0])
    if nrec == 0 and (aux is None or aux.numel() == 0):
        return None
    if src_block0 < 0:
        raise IndexError(f"source block {src_block0} is negative")

    rec = _records(nrec)
    rb = L.emb_row_bytes
    keep: list = []
    if nrec:
        # a destination block listed twice: the reference writes it twice, the last write wins
        if np.unique(dblk).size != nrec:
            _, first_in_rev = np.unique(dblk[::-1], return_index=True)
            sel = np.sort(nrec - 1 - first_in_rev)
        else:
            sel = None
        j = np.arange(nrec, dtype=np.int64)
        if hasattr(src, "blocks"):          # blocks of a pool
            sp = src.pool
            if sp.layout.block_size != bs:
                raise ValueError("source pool block size differs from the destination's")
            if src_block0 + nrec > len(src.blocks):
                raise IndexError(f"source blocks {src_block0}..{src_block0 + nrec - 1} outside the "
                                 f"{len(src.blocks)} source blocks")
            sblk = _norm_blocks(src.blocks[src_block0:src_block0 + nrec], nrec, sp.layout.num_blocks, "source")
            rec[:, 1] = sp.embeddings.data_ptr() + sblk * sp.layout.emb_block_bytes
            rec[:, 4] = sp.fill_ids.data_ptr() + sblk * bs * 4
            rec[:, 7] = sp.mrope.data_ptr() + sblk * 3 * bs * 4
            rec[:, 10] = bs * 4
        else:
            e, f, m = src.embeddings, src.fill_ids, src.mrope_positions
            T = e.shape[0]
            last = (src_block0 + nrec - 1) * bs + int(rows[-1])
            if last > T:
                raise RuntimeError(f"the chunk needs source tokens up to {last}, the source has {T}")
            if not e.is_contiguous():
                e = e.contiguous()
                keep.append(e)
            if f.stride(0) != 1:
                f = f.contiguous()
                keep.append(f)
            if m.stride(1) != 1:
                m = m.contiguous()
                keep.append(m)
            tok = (src_block0 + j) * bs
            rec[:, 1] = e.data_ptr() + tok * rb
            rec[:, 4] = f.data_ptr() + tok * 4
            rec[:, 7] = m.data_ptr() + tok * 4
            rec[:, 10] = m.stride(0) * 4
        rec[:, 0] = dst.embeddings.data_ptr() + dblk * L.emb_block_bytes
        rec[:, 2] = rows * rb
        rec[:, 3] = dst.fill_ids.data_ptr() + dblk * bs * 4
        rec[:, 5] = rows * 4
        rec[:, 6] = dst.mrope.data_ptr() + dblk * 3 * bs * 4
        rec[:, 8] = rows * 4
        rec[:, 9] = bs * 4
        if sel is not None:
            # the last occurrence of a block wins row by row: when that is the
            # partial final record, the rows past its end keep what the latest
            # earlier (full) occurrence wrote, so that one is kept, trimmed to them
            last = nrec - 1
            r = int(rows[last])
            if r < bs:
                prior = np.nonzero(dblk[:last] == dblk[last])[0]
                if prior.size:
                    p = int(prior[-1])
                    rec[p, [0, 1]] += r * rb
                    rec[p, 2] = (bs - r) * rb
                    rec[p, [3, 4, 6, 7]] += r * 4
                    rec[p, [5, 8]] = (bs - r) * 4
                    sel = np.sort(np.append(sel, p))
            rec = rec[sel]
    launch = Launch(rec.reshape(-1).copy(), int(rec.shape[0]), _emb_ctas(bs * rb), keep=keep)
    if aux is not None:
        _attach_aux(launch, dst, db0, aux)
    return launch


def plan_gather(src_pool, src_blocks: Sequence[int], n_tokens: int, out_e: torch.Tensor,
                out_f: torch.Tensor, out_m: torch.Tensor) -> Optional[Launch]:
    """Descriptors for gathering into outputs that are exactly the chunk's
    tokens: ``out_e`` [n, H] contiguous, ``out_f`` [n] unit stride, ``out_m``
    [3, n] unit stride along tokens."""
    L = src_pool.layout
    bs = L.block_size
    src_blocks = list(src_blocks)
    rows = _chunk_rows(n_tokens, bs, len(src_blocks))
    nrec = int(rows.size)
    if nrec == 0:
        return None
    sblk = _norm_blocks(src_blocks, nrec, L.num_blocks, "source")
    rb = L.emb_row_bytes
    j = np.arange(nrec, dtype=np.int64)
    tok = j * bs
    rec = _records(nrec)
    rec[:, 0] = out_e.data_ptr() + tok * rb
    rec[:, 1] = src_pool.embeddings.data_ptr() + sblk * L.emb_block_bytes
    rec[:, 2] = rows * rb
    rec[:, 3] = out_f.data_ptr() + tok * 4
    rec[:, 4] = src_pool.fill_ids.data_ptr() + sblk * bs * 4
    rec[:, 5] = rows * 4
    rec[:, 6] = out_m.data_ptr() + tok * 4
    rec[:, 7] = src_pool.mrope.data_ptr() + sblk * 3 * bs * 4
    rec[:, 8] = rows * 4
    rec[:, 9] = out_m.stride(0) * 4
    rec[:, 10] = bs * 4
    return Launch(rec.reshape(-1).copy(), nrec, _emb_ctas(bs * rb))


# ---------------------------------------------------------------------------
# launching
# ---------------------------------------------------------------------------
def run_launch(launch: Launch, device: int) -> None:
    """Upload the descriptors (one H2D copy) and launch on ``device``'s
    current torch stream.  Asynchronous."""
    if launch.grid == 0:
        return
    cp = _cupy()
    fn = _kernel()
    dev = torch.device("cuda", device)
    stream = torch.cuda.current_stream(dev)
    if launch.desc.size:
        d = torch.from_numpy(launch.desc).to(dev, non_blocking=True)
        dptr = d.data_ptr()
    else:
        d, dptr = None, 0
    args = (np.int64(dptr), np.int32(launch.nrec), np.int32(launch.emb_ctas),
            np.int64(launch.aux_dst), np.int64(launch.aux_src_for(dptr) if launch.aux_n else 0),
            np.int64(launch.aux_n))
    with cp.cuda.Device(device):
        fn((launch.grid,), (THREADS,), args,
           stream=cp.cuda.ExternalStream(stream.cuda_stream, device))
    # ``d`` and the temporaries in ``launch.keep`` were allocated by torch's
    # stream-ordered caching allocator on this very stream (the launch device
    # is the device of every tensor the plan read), so releasing them now
    # cannot recycle their memory before the kernel has run.
    del d


def _dev_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _src_device(src) -> Optional[torch.device]:
    """The one device all of ``src``'s tensors live on, or ``None`` if mixed."""
    if not hasattr(src, "blocks"):          # tensors straight from the model
        devs = {src.embeddings.device, src.fill_ids.device, src.mrope_positions.device}
        return devs.pop() if len(devs) == 1 else None
    return src.device


def _overlaps(src, dst) -> bool:
    if not hasattr(src, "blocks"):          # only a pool source can overlap a pool
        return False
    a0, a1 = src.pool.backing.raw.data_ptr(), src.pool.backing.raw.data_ptr() + src.pool.layout.nbytes
    b0, b1 = dst.backing.raw.data_ptr(), dst.backing.raw.data_ptr() + dst.layout.nbytes
    return a0 < b1 and b0 < a1


def scatter_chunk(dst, dst_blocks: Sequence[int], src, src_block0: int, n_tokens: int,
                  aux: Optional[torch.Tensor] = None) -> None:
    """CUDA twin of :func:`embresume.kernels.cpu.scatter_chunk` (same semantics)."""
    L = dst.layout
    ddev = _dev_index(dst.embeddings)
    if src.hidden != L.hidden or src.dtype != L.dtype or _overlaps(src, dst):
        # conversions and overlapping copies: the reference (torch copy_ on CUDA)
        return cpu.scatter_chunk(dst, dst_blocks, src, src_block0, n_tokens, aux)
    bs = L.block_size
    nblocks = int(_chunk_rows(n_tokens, bs, len(list(dst_blocks))).size)
    sdev_t = _src_device(src)
    launch_dev = ddev
    if nblocks:
        if sdev_t is None or sdev_t.type != "cuda":
            # a host (or mixed) source: the caller stages it (embresume.source.stage_chunk);
            # unstaged, the reference copies it (correct, not fast)
            return cpu.scatter_chunk(dst, dst_blocks, src, src_block0, n_tokens, aux)
        sdev = sdev_t.index if sdev_t.index is not None else torch.cuda.current_device()
        if sdev != ddev:
            if not _can_access(sdev, ddev):
                # no peer access: the caller stages through pinned memory; unstaged, the reference
                return cpu.scatter_chunk(dst, dst_blocks, src, src_block0, n_tokens, aux)
            launch_dev = sdev
    if aux is not None and aux.is_cuda and _dev_index(aux) != launch_dev:
        aux = aux.cpu()
    launch = plan_scatter(dst, dst_blocks, src, src_block0, n_tokens, aux)
    if launch is not None:
        run_launch(launch, launch_dev)


def gather_chunk(src_pool, src_blocks: Sequence[int], n_tokens: int, out_embeddings: torch.Tensor,
                 out_fill_ids: torch.Tensor, out_mrope: torch.Tensor, out_token0: int) -> None:
    """CUDA twin of :func:`embresume.kernels.cpu.gather_chunk` (same semantics)."""
    L = src_pool.layout
    bs = L.block_size
    src_blocks = list(src_blocks)
    rows = _chunk_rows(n_tokens, bs, len(src_blocks))
    tot = int(rows.sum()) if rows.size else 0
    if tot == 0:
        return
    o = int(out_token0)
    if o < 0:
        raise IndexError(f"out_token0 {o} is negative")
    if out_embeddings.dim() != 2 or out_embeddings.shape[1] != L.hidden:
        raise RuntimeError(f"out_embeddings must be [N, {L.hidden}], got {tuple(out_embeddings.shape)}")
    if out_mrope.dim() != 2 or out_mrope.shape[0] != 3:
        raise RuntimeError(f"out_mrope must be [3, N], got {tuple(out_mrope.shape)}")
    for name, n_out in (("out_embeddings", out_embeddings.shape[0]), ("out_fill_ids", out_fill_ids.shape[0]),
                        ("out_mrope", out_mrope.shape[1])):
        if o + tot > n_out:
            raise RuntimeError(f"{name} has {n_out} tokens, the chunk needs {o + tot}")
    dev = _dev_index(src_pool.embeddings)
    tdev = torch.device("cuda", dev)
    # raises IndexError early, before any output is touched
    _norm_blocks(src_blocks, int(rows.size), L.num_blocks, "source")

    e_out = out_embeddings[o:o + tot]
    f_out = out_fill_ids[o:o + tot]
    m_out = out_mrope[:, o:o + tot]
    e_t = e_out if (e_out.device == tdev and e_out.dtype == L.dtype and e_out.is_contiguous()) else None
    f_t = f_out if (f_out.device == tdev and f_out.dtype == torch.int32 and f_out.dim() == 1
                    and f_out.stride(0) == 1) else None
    m_t = m_out if (m_out.device == tdev and m_out.dtype == torch.int32 and m_out.stride(1) == 1) else None
    e_k = e_t if e_t is not None else torch.empty((tot, L.hidden), dtype=L.dtype, device=tdev)
    f_k = f_t if f_t is not None else torch.empty((tot,), dtype=torch.int32, device=tdev)
    m_k = m_t if m_t is not None else torch.empty((3, tot), dtype=torch.int32, device=tdev)
    launch = plan_gather(src_pool, src_blocks, n_tokens, e_k, f_k, m_k)
    if launch is not None:
        run_launch(launch, dev)
    # outputs that could not be written in place (other device/dtype/layout):
    # stream-ordered copies from the temporaries, converting like the reference
    if e_t is None:
        e_out.copy_(e_k)
    if f_t is None:
        f_out.copy_(f_k)
    if m_t is None:
        m_out.copy_(m_k)


__all__ = ["scatter_chunk", "gather_chunk", "plan_scatter", "plan_gather", "run_launch",
           "Launch", "KERNEL_SOURCE", "CudaUnavailable", "is_available", "unavailable_reason"]
