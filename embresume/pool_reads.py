"""What the language endpoint reads out of its receive pool, and the results it makes of it.

:class:`PoolReads` is the one place the language side looks at pool memory:
the aux record of a request's first block (which the endpoint hands the
room machine as data, in the STATUS or PROGRESS event), the copies of a
chunk's blocks into the request's merge buffer, the merged result, and the
zero-copy result (a view of consecutive pool blocks).  The buffers and
results belong to the request's entry of the endpoint's own table
(:class:`~embresume.shell_rooms.RoomIO`); which blocks to read is the room
machine's decision, carried in its actions.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .blocks import BlockPool
from .kernels.cpu import pool_arrays
from .merge import EmbeddingResult, MergeBuffer, ResultArena
from .shell_rooms import RoomIO


class PoolReads:
    """Reads out of ``pool`` for the language endpoint (see the module docstring).
    ``move_to``: the device results are moved to when the pool stayed on the
    host for a GPU model (None: results stay where the pool is)."""

    def __init__(self, pool: BlockPool, arena: ResultArena, move_to: Optional[str] = None):
        self.pool = pool
        self.layout = pool.layout
        self.arena = arena
        self.move_to = move_to
        #: read once (torch attribute reads and torch.device() cost microseconds on every chunk)
        self.host = not pool.is_cuda
        self.device = str(pool.device)
        #: storage offsets of the pool's views (as_strided takes absolute offsets)
        self.emb_off = pool.embeddings.storage_offset()
        self.fill_off = pool.fill_ids.storage_offset()

    def aux(self, block: int) -> tuple:
        """(total tokens, aux record) from the aux of ``block``."""
        if self.host:
            # numpy: one small copy instead of three torch ops (index, clone, cpu) and a scalar read
            a = pool_arrays(self.pool)[3][block].copy()
            return int(a[0]), torch.from_numpy(a)
        aux = self.pool.aux[block].clone().cpu()
        return int(aux[0]), aux

    def copy(self, e: RoomIO, blocks: list, tokens: int) -> Optional[str]:
        """Copy ``tokens`` tokens out of ``blocks`` into the merge buffer of ``e``
        (made at the first copy); returns why it failed, or None."""
        req = e.req
        try:
            if e.merge is None:
                e.merge = MergeBuffer(req.total_tokens, self.layout.hidden, self.layout.dtype, self.device, req.aux,
                                      self.arena)
            if tokens:
                e.merge.add(self.pool, blocks, tokens)
            if not self.host:
                # gather kernels are asynchronous: the blocks are freed (and may be
                # written by the encoder for another request) only after they finished
                torch.cuda.current_stream(self.pool.device).synchronize()
        except Exception as err:  # pragma: no cover - a copy failing is a bug or a dead device
            return f"{type(err).__name__}: {err}"
        return None

    def complete(self, e: RoomIO) -> None:
        """All tokens landed in the merge buffer of ``e``: it becomes the result."""
        req = e.req
        res = e.merge.result(req.room, list(req.tracker.history), req.chunks)
        if self.move_to is not None:
            res.embeddings, res.fill_ids, res.mrope_positions = (
                t.to(self.move_to) for t in (res.embeddings, res.fill_ids, res.mrope_positions))
        e.result = res
        e.merge = None

    def zero_copy(self, e: RoomIO, blocks: list, tokens: int, lease) -> None:
        """A one-chunk request in consecutive ``blocks``: its result is a view of
        the pool (no gather copy), holding ``lease`` (the blocks stay lent to it)."""
        req = e.req
        bs, H = self.layout.block_size, self.layout.hidden
        need = len(blocks)
        b0 = blocks[0]
        pool = self.pool
        # one torch op per view (as_strided on the pool's own tensors: consecutive blocks are contiguous)
        emb = pool.embeddings.as_strided((tokens, H), (H, 1), self.emb_off + b0 * bs * H)
        fill = pool.fill_ids.as_strided((tokens,), (1,), self.fill_off + b0 * bs)
        # mrope is [3, bs] per block: [3, T] needs this small copy (12 bytes a token)
        if self.host:
            m = pool_arrays(pool)[2][b0:b0 + need].transpose(1, 0, 2).reshape(3, need * bs)[:, :tokens]
            mrope = torch.from_numpy(np.ascontiguousarray(m))
        else:
            mrope = pool.mrope[b0:b0 + need].transpose(0, 1).reshape(3, need * bs)[:, :tokens].contiguous()
        e.result = EmbeddingResult(req.room, emb, fill, mrope, req.aux, 1, list(req.tracker.history), lease)
