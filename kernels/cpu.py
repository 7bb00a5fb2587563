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


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's bytes as same-width integers (no copy)."""
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


def _source_rows(src, bs: int):
    """A function ``rows(j, n)`` giving numpy views of source block ``j``'s first ``n`` tokens."""
    if hasattr(src, "blocks"):          # BlockSource: blocks of a pool
        if bs != src.pool.layout.block_size:
            raise ValueError("source pool block size differs from the destination's")
        e, f, m, _ = pool_arrays(src.pool)
        blocks = src.blocks
        return lambda j, n: (e[blocks[j], :n], f[blocks[j], :n], m[blocks[j], :, :n])
    e, f, m = as_numpy(src.embeddings), as_numpy(src.fill_ids), as_numpy(src.mrope_positions)
    return lambda j, n: (e[j * bs:j * bs + n], f[j * bs:j * bs + n], m[:, j * bs:j * bs + n])


def scatter_chunk(dst, dst_blocks: Sequence[int], src, src_block0: int, n_tokens: int,
                  aux: Optional[torch.Tensor] = None) -> None:
    """Copy ``n_tokens`` tokens of ``src`` starting at block ``src_block0``
    into the destination pool blocks ``dst_blocks`` (in order).

    The last block may be partial: only its first rows are written.  When
    ``aux`` is given it is written into the aux record of ``dst_blocks[0]``.
    """
    bs = dst.layout.block_size
    need = -(-n_tokens // bs)
    if need > len(dst_blocks):
        raise ValueError(f"{n_tokens} tokens need {need} destination blocks, {len(dst_blocks)} given")
    de, df, dm, da = pool_arrays(dst)
    rows = _source_rows(src, bs)
    left = n_tokens
    for j in range(need):
        db = dst_blocks[j]
        n = min(bs, left)
        e, f, m = rows(src_block0 + j, n)
        np.copyto(de[db, :n], e, casting="no")
        np.copyto(df[db, :n], f, casting="no")
        np.copyto(dm[db, :, :n], m, casting="no")
        left -= n
    if aux is not None:
        a = as_numpy(aux.to(torch.int32).cpu().contiguous())
        np.copyto(da[dst_blocks[0], :a.shape[0]], a, casting="no")


def gather_chunk(src_pool, src_blocks: Sequence[int], n_tokens: int, out_embeddings: torch.Tensor,
                 out_fill_ids: torch.Tensor, out_mrope: torch.Tensor, out_token0: int) -> None:
    """Copy ``n_tokens`` tokens out of pool blocks ``src_blocks`` into the
    contiguous outputs at token offset ``out_token0``."""
    bs = src_pool.layout.block_size
    need = -(-n_tokens // bs)
    if need > len(src_blocks):
        raise ValueError(f"{n_tokens} tokens need {need} source blocks, {len(src_blocks)} given")
    se, sf, sm, _ = pool_arrays(src_pool)
    oe, of, om = as_numpy(out_embeddings), as_numpy(out_fill_ids), as_numpy(out_mrope)
    left, o = n_tokens, out_token0
    for j in range(need):
        b = src_blocks[j]
        n = min(bs, left)
        np.copyto(oe[o:o + n], se[b, :n], casting="no")
        np.copyto(of[o:o + n], sf[b, :n], casting="no")
        np.copyto(om[:, o:o + n], sm[b, :, :n], casting="no")
        o += n
        left -= n
