"""The chunk planner: one pure function deciding what the encoder sends next.

    remaining = total_tokens - sent_tokens
    if remaining > allocated_tokens: send allocated_tokens, partial   -> Transferring
    else:                            send remaining,        complete  -> Success

A chunk always starts on a block boundary of the source (``sent_tokens`` is a
sum of earlier ``allocated_tokens``, each a multiple of the block size).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from .errors import BlockSizeMismatch, ProtocolError


class ChunkPlan(NamedTuple):
    src_block_start: int          # first source block (token sent_tokens)
    src_block_end: int            # one past the last source block used
    dst_blocks: tuple[int, ...]   # destination blocks actually written
    tokens: int                   # tokens in this chunk
    sent_tokens_after: int        # sent_tokens once this chunk landed
    partial: bool                 # True -> Transferring, False -> Success


def check_block_size(allocated_tokens: int, dst_blocks: Sequence[int], block_size: int) -> None:
    """Rule 2 of DESIGN.md: ``allocated_tokens // len(dst_blocks) == block_size``."""
    if len(dst_blocks) == 0:
        raise BlockSizeMismatch("no destination blocks were given")
    if allocated_tokens % len(dst_blocks) != 0 or allocated_tokens // len(dst_blocks) != block_size:
        raise BlockSizeMismatch(
            f"block size mismatch: allocated_tokens={allocated_tokens} over {len(dst_blocks)} blocks "
            f"is {allocated_tokens / len(dst_blocks):g} tokens per block, the pool's block size is {block_size}"
            " (send len(blocks) * block_size, not the configured default)")


def plan_chunk(total_tokens: int, sent_tokens: int, allocated_tokens: int, block_size: int,
               dst_blocks: Sequence[int]) -> ChunkPlan:
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    if total_tokens <= 0:
        raise ProtocolError("total_tokens", f"must be positive, got {total_tokens}")
    if not 0 <= sent_tokens < total_tokens:
        raise ProtocolError("sent_tokens", f"{sent_tokens} is outside [0, {total_tokens})")
    if sent_tokens % block_size:
        raise ProtocolError("sent_tokens", f"{sent_tokens} is not a multiple of the block size {block_size}")
    if allocated_tokens <= 0:
        raise ProtocolError("allocated_tokens", f"must be positive, got {allocated_tokens}")
    check_block_size(allocated_tokens, dst_blocks, block_size)
    remaining = total_tokens - sent_tokens
    if remaining > allocated_tokens:
        tokens, partial = allocated_tokens, True
    else:
        tokens, partial = remaining, False
    nblocks = -(-tokens // block_size)
    start = sent_tokens // block_size
    return ChunkPlan(start, start + nblocks, tuple(map(int, dst_blocks[:nblocks])), tokens,
                     sent_tokens + tokens, partial)
