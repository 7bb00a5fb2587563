"""CPU implementations of the block copies.

They define the semantics the CUDA kernels reproduce bit for bit.  Copies go
through numpy views of the tensors' bytes (reinterpreted as integers of the
same width, so any float dtype is copied exactly): numpy copies on the calling
thread with the GIL released.  torch's CPU ``copy_`` splits copies over its
intra-op threads, which on a small, busy machine made a 64-block scatter 20x
slower than a single-threaded memcpy (measured on the 2-core development
machine: 80 ms vs 3.9 ms for 64 MiB).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


_INT_DTYPES = frozenset(_INT_OF_SIZE.values())


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's bytes as same-width integers (no copy);
    a numpy array is returned as it is."""
    if type(t) is np.ndarray:
        return t
    if t.dtype in _INT_DTYPES:
        return t.numpy()            # already integers: one torch call instead of two
    return t.view(_INT_OF_SIZE[t.element_size()]).numpy()


def copy_tensor(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for same-dtype tensors, single-threaded on the CPU."""
    if dst.device.type == "cpu" and src.device.type == "cpu":
        np.copyto(as_numpy(dst), as_numpy(src), casting="no")
    else:
        dst.copy_(src)


def pool_arrays(pool):
    """numpy views (embeddings, fill_ids, mrope, aux) of a CPU pool, cached on it."""
    cached = getattr(pool, "_np_views", None)
    if cached is None or cached[0] is not pool.embeddings:
        arrs = (as_numpy(pool.embeddings), as_numpy(pool.fill_ids), as_numpy(pool.mrope), as_numpy(pool.aux))
        cached = (pool.embeddings, arrs)
        pool._np_views = cached
    return cached[1]


def _runs(dst_blocks: Sequence[int], src_blocks, need: int, n_tokens: int, bs: int):
    """Split the chunk's blocks into runs of consecutive destination (and, for a
    pool source, source) blocks: ``(j0, j1, tokens)``.  One big copy per run lets
    memcpy stream with non-temporal stores; per 1 MiB block it cannot."""
    j0 = 0
    for j in range(1, need + 1):
        if (j == need or dst_blocks[j] != dst_blocks[j - 1] + 1
                or (src_blocks is not None and src_blocks[j] != src_blocks[j - 1] + 1)):
            yield j0, j, min(n_tokens, j * bs) - j0 * bs
            j0 = j


def _check_blocks(blocks: Sequence[int], need: int, num_blocks: int, what: str) -> None:
    if need <= 0:
        return
    head = blocks[:need]
    if min(head) >= 0 and max(head) < num_blocks:   # C-level: no Python loop on the hot path
        return
    for b in head:
        if not 0 <= b < num_blocks:
            raise IndexError(f"{what} block {b} is out of range [0, {num_blocks})")


def scatter_chunk(dst, dst_blocks: Sequence[int], src, src_block0: int, n_tokens: int,
                  aux: Optional[torch.Tensor] = None) -> None:
    """Copy ``n_tokens`` tokens of ``src`` starting at block ``src_block0``
    into the destination pool blocks ``dst_blocks`` (in order).

    The last block may be partial: only its first rows are written.  When
    ``aux`` is given it is written into the aux record of ``dst_blocks[0]``.
    """
    bs = dst.layout.block_size
    need = -(-n_tokens // bs) if n_tokens > 0 else 0
    if need > len(dst_blocks):
        raise ValueError(f"{n_tokens} tokens need {need} destination blocks, {len(dst_blocks)} given")
    de, df, dm, da = pool_arrays(dst)
    H = de.shape[2]
    _check_blocks(dst_blocks, max(need, 1 if aux is not None else 0), de.shape[0], "destination")
    if hasattr(src, "blocks"):          # BlockSource: blocks of a pool
        if bs != src.pool.layout.block_size:
            raise ValueError("source pool block size differs from the destination's")
        se, sf, sm, _ = pool_arrays(src.pool)
        sblocks = src.blocks[src_block0:src_block0 + need]
        _check_blocks(sblocks, need, se.shape[0], "source")
        if len(sblocks) < need:
            raise ValueError(f"the chunk needs {need} source blocks from {src_block0}, the source has "
                             f"{len(src.blocks)}")
        for j0, j1, n in _runs(dst_blocks, sblocks, need, n_tokens, bs):
            d0, s0, r = dst_blocks[j0], sblocks[j0], j1 - j0
            np.copyto(de[d0:d0 + r].reshape(r * bs, H)[:n], se[s0:s0 + r].reshape(r * bs, H)[:n], casting="no")
            np.copyto(df[d0:d0 + r].reshape(r * bs)[:n], sf[s0:s0 + r].reshape(r * bs)[:n], casting="no")
            full = n // bs
            if full:
                np.copyto(dm[d0:d0 + full], sm[s0:s0 + full], casting="no")
            if n > full * bs:
                np.copyto(dm[d0 + full, :, :n - full * bs], sm[s0 + full, :, :n - full * bs], casting="no")
    else:                               # TensorSource: contiguous tensors
        host = getattr(src, "host_arrays", None)
        if host is not None:
            se, sf, sm = host()
        else:
            se, sf, sm = as_numpy(src.embeddings), as_numpy(src.fill_ids), as_numpy(src.mrope_positions)
        t_base = src_block0 * bs
        if t_base + n_tokens > se.shape[0]:
            raise ValueError(f"the chunk needs source tokens up to {t_base + n_tokens}, the source has "
                             f"{se.shape[0]}")
        if need == 1:                   # one block (small requests): the fewest numpy ops
            d0, n = dst_blocks[0], n_tokens
            np.copyto(de[d0, :n], se[t_base:t_base + n], casting="no")
            np.copyto(df[d0, :n], sf[t_base:t_base + n], casting="no")
            np.copyto(dm[d0, :, :n], sm[:, t_base:t_base + n], casting="no")
            need = 0                    # nothing left for the loop below
        for j0, j1, n in _runs(dst_blocks, None, need, n_tokens, bs):
            d0, r, t0 = dst_blocks[j0], j1 - j0, t_base + j0 * bs
            np.copyto(de[d0:d0 + r].reshape(r * bs, H)[:n], se[t0:t0 + n], casting="no")
            np.copyto(df[d0:d0 + r].reshape(r * bs)[:n], sf[t0:t0 + n], casting="no")
            full = n // bs
            if full:
                np.copyto(dm[d0:d0 + full], sm[:, t0:t0 + full * bs].reshape(3, full, bs).transpose(1, 0, 2),
                          casting="no")
            if n > full * bs:
                np.copyto(dm[d0 + full, :, :n - full * bs], sm[:, t0 + full * bs:t0 + n], casting="no")
    if aux is not None:
        if type(aux) is np.ndarray and aux.dtype == np.int32:
            a = aux                     # the endpoints' aux record (source.aux_record)
        elif aux.dtype == torch.int32 and not aux.is_cuda:
            a = aux.numpy()             # the usual case (make_aux): no conversion ops
        else:
            a = as_numpy(aux.to(torch.int32).cpu().contiguous())
        np.copyto(da[dst_blocks[0], :a.shape[0]], a, casting="no")


def gather_chunk(src_pool, src_blocks: Sequence[int], n_tokens: int, out_embeddings: torch.Tensor,
                 out_fill_ids: torch.Tensor, out_mrope: torch.Tensor, out_token0: int) -> None:
    """Copy ``n_tokens`` tokens out of pool blocks ``src_blocks`` into the
    contiguous outputs at token offset ``out_token0``."""
    bs = src_pool.layout.block_size
    need = -(-n_tokens // bs) if n_tokens > 0 else 0
    if need > len(src_blocks):
        raise ValueError(f"{n_tokens} tokens need {need} source blocks, {len(src_blocks)} given")
    se, sf, sm, _ = pool_arrays(src_pool)
    H = se.shape[2]
    _check_blocks(src_blocks, need, se.shape[0], "source")
    oe, of, om = as_numpy(out_embeddings), as_numpy(out_fill_ids), as_numpy(out_mrope)
    if need == 1:                       # one block (small requests): the fewest numpy ops
        s0, o, n = src_blocks[0], out_token0, n_tokens
        np.copyto(oe[o:o + n], se[s0, :n], casting="no")
        np.copyto(of[o:o + n], sf[s0, :n], casting="no")
        np.copyto(om[:, o:o + n], sm[s0, :, :n], casting="no")
        return
    for j0, j1, n in _runs(src_blocks, None, need, n_tokens, bs):
        s0, r, o = src_blocks[j0], j1 - j0, out_token0 + j0 * bs
        np.copyto(oe[o:o + n], se[s0:s0 + r].reshape(r * bs, H)[:n], casting="no")
        np.copyto(of[o:o + n], sf[s0:s0 + r].reshape(r * bs)[:n], casting="no")
        full = n // bs
        if full:
            np.copyto(om[:, o:o + full * bs].reshape(3, full, bs).transpose(1, 0, 2), sm[s0:s0 + full],
                      casting="no")
        if n > full * bs:
            np.copyto(om[:, o + full * bs:o + n], sm[s0 + full, :, :n - full * bs], casting="no")
