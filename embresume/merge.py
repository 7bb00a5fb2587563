"""Merging the chunks of one request into contiguous tensors.

The language side learns the request's total token count from the aux record
of the first chunk, allocates the final tensors once, and gathers every chunk
(first and resumed ones) straight into its place: the merge at Success is free
and no partial copy is ever made twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .kernels import gather_chunk
from .status import Status


@dataclass
class EmbeddingResult:
    """A request's merged embedding, as the language model consumes it."""

    room: int
    embeddings: torch.Tensor        # [T, hidden]
    fill_ids: torch.Tensor          # int32 [T]
    mrope_positions: torch.Tensor   # int32 [3, T]
    aux: torch.Tensor               # int32 [aux_ints], from the first chunk
    chunks: int = 1
    history: list[Status] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def mrope_delta(self) -> int:
        return int(self.aux[1])

    @property
    def resumes(self) -> int:
        return self.chunks - 1


class MergeBuffer:
    """Destination of the chunks of one request."""

    def __init__(self, total_tokens: int, hidden: int, dtype: torch.dtype, device, aux: torch.Tensor):
        self.total_tokens = total_tokens
        self.embeddings = torch.empty((total_tokens, hidden), dtype=dtype, device=device)
        self.fill_ids = torch.empty(total_tokens, dtype=torch.int32, device=device)
        self.mrope_positions = torch.empty((3, total_tokens), dtype=torch.int32, device=device)
        self.aux = aux
        self.filled = 0
        self.chunks = 0

    def add_chunk(self, pool, blocks: Sequence[int], tokens: int) -> None:
        if tokens <= 0 or self.filled + tokens > self.total_tokens:
            raise ValueError(f"chunk of {tokens} tokens does not fit: {self.filled}/{self.total_tokens} filled")
        need = -(-tokens // pool.layout.block_size)
        if need > len(blocks):
            raise ValueError(f"chunk of {tokens} tokens needs {need} blocks, {len(blocks)} given")
        gather_chunk(pool, blocks, tokens, self.embeddings, self.fill_ids, self.mrope_positions, self.filled)
        self.filled += tokens
        self.chunks += 1

    @property
    def complete(self) -> bool:
        return self.filled == self.total_tokens

    def result(self, room: int, history: list[Status]) -> EmbeddingResult:
        if not self.complete:
            raise ValueError(f"merge incomplete: {self.filled}/{self.total_tokens} tokens")
        return EmbeddingResult(room, self.embeddings, self.fill_ids, self.mrope_positions, self.aux,
                               self.chunks, list(history))
