"""CPU implementations of the block copies (torch ``copy_``; no Python per token).

They define the semantics the CUDA kernels must reproduce bit for bit.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def scatter_chunk(dst, dst_blocks: Sequence[int], src, src_block0: int, n_tokens: int,
                  aux: Optional[torch.Tensor] = None) -> None:
    """Copy ``n_tokens`` tokens of ``src`` starting at block ``src_block0``
    into the destination pool blocks ``dst_blocks`` (in order).

    The last block may be partial: only its first rows are written.  When
    ``aux`` is given it is written into the aux record of ``dst_blocks[0]``.
    """
    bs = dst.layout.block_size
    left = n_tokens
    for j, db in enumerate(dst_blocks):
        if left <= 0:
            break
        n = min(bs, left)
        e, f, m = src.block_rows(src_block0 + j, bs, n)
        dst.embeddings[db, :n].copy_(e)
        dst.fill_ids[db, :n].copy_(f)
        dst.mrope[db, :, :n].copy_(m)
        left -= n
    if aux is not None:
        dst.aux[dst_blocks[0], :aux.numel()].copy_(aux)


def gather_chunk(src_pool, src_blocks: Sequence[int], n_tokens: int, out_embeddings: torch.Tensor,
                 out_fill_ids: torch.Tensor, out_mrope: torch.Tensor, out_token0: int) -> None:
    """Copy ``n_tokens`` tokens out of pool blocks ``src_blocks`` into the
    contiguous outputs at token offset ``out_token0``."""
    bs = src_pool.layout.block_size
    left = n_tokens
    o = out_token0
    for b in src_blocks:
        if left <= 0:
            break
        n = min(bs, left)
        out_embeddings[o:o + n].copy_(src_pool.embeddings[b, :n])
        out_fill_ids[o:o + n].copy_(src_pool.fill_ids[b, :n])
        out_mrope[:, o:o + n].copy_(src_pool.mrope[b, :, :n])
        o += n
        left -= n
