"""What the encoder sends: a finished embedding, as tensors or as pool blocks.

Both kinds expose the same per-token view the planner and the copy kernels
need: ``rows(start, n)`` of embeddings ``[n, hidden]``, fill_ids ``[n]`` and
mrope positions ``[3, n]`` — without copying.  A chunk always starts at a
multiple of the block size, so a source block maps onto a destination block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .blocks import BlockPool
from .errors import ConfigError


@dataclass
class TensorSource:
    """Contiguous tensors straight from the model: no staging copy."""

    embeddings: torch.Tensor        # [T, hidden]
    fill_ids: torch.Tensor          # int32 [T]
    mrope_positions: torch.Tensor   # int32 [3, T]
    mrope_delta: int = 0

    def __post_init__(self) -> None:
        e, f, m = self.embeddings, self.fill_ids, self.mrope_positions
        if e.dim() != 2:
            raise ConfigError(f"embeddings must be [T, hidden], got shape {tuple(e.shape)}")
        T = e.shape[0]
        if T <= 0:
            raise ConfigError("an embedding needs at least one token")
        if f.shape != (T,):
            raise ConfigError(f"fill_ids must be [{T}], got {tuple(f.shape)}")
        if m.shape != (3, T):
            raise ConfigError(f"mrope_positions must be [3, {T}], got {tuple(m.shape)}")
        if f.dtype != torch.int32 or m.dtype != torch.int32:
            raise ConfigError("fill_ids and mrope_positions must be int32")
        if not e.is_contiguous():
            self.embeddings = e = e.contiguous()
        # read once: torch attribute reads cost microseconds each on a cold cache,
        # and the encoder asks for them on every chunk
        self._shape = (T, e.shape[1], e.dtype, e.device)
        self._host = None

    @property
    def total_tokens(self) -> int:
        return self._shape[0]

    @property
    def hidden(self) -> int:
        return self._shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self._shape[2]

    @property
    def device(self) -> torch.device:
        return self._shape[3]

    def host_arrays(self):
        """numpy views (same-width integers) of the three host tensors, made once."""
        h = self._host
        if h is None:
            from embresume.kernels.cpu import as_numpy
            h = self._host = (as_numpy(self.embeddings), as_numpy(self.fill_ids),
                              as_numpy(self.mrope_positions))
        return h

    def block_rows(self, block: int, block_size: int, n: int):
        """Views of ``n`` tokens starting at token ``block * block_size``."""
        s = block * block_size
        return (self.embeddings[s:s + n], self.fill_ids[s:s + n], self.mrope_positions[:, s:s + n])


@dataclass
class BlockSource:
    """Blocks of the encoder's own pool (the original design)."""

    pool: BlockPool
    blocks: Sequence[int]
    total_tokens: int
    mrope_delta: int = 0

    def __post_init__(self) -> None:
        bs = self.pool.layout.block_size
        if self.total_tokens <= 0:
            raise ConfigError("total_tokens must be positive")
        need = -(-self.total_tokens // bs)
        if len(self.blocks) < need:
            raise ConfigError(f"{self.total_tokens} tokens need {need} source blocks, got {len(self.blocks)}")
        nb = self.pool.layout.num_blocks
        for b in self.blocks:
            if not 0 <= int(b) < nb:
                raise ConfigError(f"source block {b} out of range [0, {nb})")
        self.blocks = [int(b) for b in self.blocks]

    @property
    def hidden(self) -> int:
        return self.pool.layout.hidden

    @property
    def dtype(self) -> torch.dtype:
        return self.pool.layout.dtype

    @property
    def device(self) -> torch.device:
        return self.pool.device

    def block_rows(self, block: int, block_size: int, n: int):
        if block_size != self.pool.layout.block_size:
            raise ConfigError("source pool block size differs from the destination's")
        b = self.blocks[block]
        p = self.pool
        return (p.embeddings[b, :n], p.fill_ids[b, :n], p.mrope[b, :, :n])


Source = TensorSource | BlockSource

# ------------------------------------------------------------------ staging
# A transport whose copy engine cannot read the source where it lives (a GPU
# source for a host pool, a host source for a GPU pool, another GPU without
# peer access) stages the chunk's tokens first.



def stage_chunk(src, src_block0: int, n_tokens: int, bs: int, nblocks: int, device,
                dtype: Optional[torch.dtype] = None, pin: bool = False):
    """A contiguous :class:`TensorSource` of just the chunk's tokens
    (``nblocks`` blocks from source block ``src_block0``) on ``device``,
    optionally staged through pinned host memory; use it with ``src_block0 = 0``."""
    rows = [min(bs, n_tokens - j * bs) for j in range(nblocks)]
    tot = sum(rows)
    if isinstance(src, TensorSource):
        t0 = src_block0 * bs
        e, f, m = (src.embeddings[t0:t0 + tot], src.fill_ids[t0:t0 + tot],
                   src.mrope_positions[:, t0:t0 + tot])
        if src_block0 < 0 or e.shape[0] != tot:
            raise RuntimeError(f"the chunk needs source tokens {t0}..{t0 + tot}, the source has "
                               f"{src.embeddings.shape[0]}")
    else:
        if src_block0 < 0:
            raise IndexError(f"source block {src_block0} is negative")
        parts = [src.block_rows(src_block0 + j, bs, n) for j, n in enumerate(rows)]
        e = torch.cat([p[0] for p in parts])
        f = torch.cat([p[1] for p in parts])
        m = torch.cat([p[2] for p in parts], dim=1)
    if dtype is not None and e.dtype != dtype:
        e = e.to(dtype)
    if pin:
        staged = []
        for x in (e, f, m):
            h = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            h.copy_(x)          # synchronous D2H (or a host copy): complete on return
            staged.append(h)
        e, f, m = staged
    # pinned -> device copies are asynchronous on the current stream; torch's
    # host allocator keeps the pinned buffers alive until they completed
    e, f, m = (x.to(device, non_blocking=True).contiguous() for x in (e, f, m))
    return TensorSource(e, f, m, getattr(src, "mrope_delta", 0))


def aux_record(total_tokens: int, mrope_delta: int, aux_ints: int) -> np.ndarray:
    """A request's aux record (int32 ``[aux_ints]``: total tokens, mrope delta,
    zeros) as a host numpy array: what the endpoints hand to
    :meth:`Transport.write_chunk` (no torch op on the hot path)."""
    aux = np.zeros(aux_ints, dtype=np.int32)
    aux[0] = total_tokens
    aux[1] = mrope_delta
    return aux


def make_aux(total_tokens: int, mrope_delta: int, aux_ints: int) -> torch.Tensor:
    """:func:`aux_record` as an int32 tensor (sharing its memory)."""
    return torch.from_numpy(aux_record(total_tokens, mrope_delta, aux_ints))
