"""Pipelined chunks on the encoder side: a chunk cut into pieces, each reported as it lands.

With ``Config.pipeline_bytes`` a transport that can (``Transport.pipelined``)
writes a chunk in pieces and the encoder reports each piece that landed
(PROGRESS), so the language side copies the first pieces out while the rest
are written.  :func:`pieces` decides the cut; it does no I/O.
"""

from __future__ import annotations

from .planner import ChunkPlan

#: pipelined chunks (Config.pipeline_bytes): a chunk is cut into about this many
#: pieces, none smaller than MIN_PIECE_BYTES of embeddings, none larger than pipeline_bytes
PIPELINE_PIECES = 4
MIN_PIECE_BYTES = 2 << 20


def pieces(plan: ChunkPlan, layout, pipeline_bytes: int, pipelined: bool) -> list[ChunkPlan]:
    """Split a chunk into pieces for pipelined delivery: at most
    ``pipeline_bytes`` each, and a chunk of a few of them into about
    PIPELINE_PIECES pieces of at least MIN_PIECE_BYTES (a 1024-token chunk
    at hidden 4096 is 8 MiB: four pieces overlap its two copies, one would
    not overlap them at all).  ``layout``: the destination pool's."""
    bb = layout.emb_block_bytes
    n = plan.src_block_end - plan.src_block_start
    per = min(pipeline_bytes // bb, max(-(-n // PIPELINE_PIECES), -(-MIN_PIECE_BYTES // bb)))
    if not pipelined or per <= 0 or n <= per:
        return [plan]
    bs = layout.block_size
    start_tokens = plan.sent_tokens_after - plan.tokens
    out = []
    for i0 in range(0, n, per):
        i1 = min(n, i0 + per)
        tokens = min(plan.tokens, i1 * bs) - i0 * bs
        out.append(ChunkPlan(plan.src_block_start + i0, plan.src_block_start + i1, plan.dst_blocks[i0:i1],
                             tokens, start_tokens + i0 * bs + tokens, plan.partial or i1 < n))
    return out
