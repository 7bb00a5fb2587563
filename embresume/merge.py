"""Merging the chunks of one request into contiguous tensors.

The language side learns the request's total token count from the aux record
of the first chunk, allocates the final tensors once, and gathers every chunk
(first and resumed ones) straight into its place: the merge at Success is free
and no partial copy is ever made twice.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .kernels import gather_chunk
from .errors import ResultReleased
from .kernels.cpu import as_numpy
from .status import Status

_TENSORS = ("embeddings", "fill_ids", "mrope_positions")


@dataclass(repr=False)
class EmbeddingResult:
    """A request's merged embedding, as the language model consumes it."""

    room: int
    embeddings: torch.Tensor        # [T, hidden]
    fill_ids: torch.Tensor          # int32 [T]
    mrope_positions: torch.Tensor   # int32 [3, T]
    aux: torch.Tensor               # int32 [aux_ints], from the first chunk
    chunks: int = 1
    history: list[Status] = field(default_factory=list)
    _lease: Optional["_Lease"] = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        """Hand the result's memory back to the endpoint for the next request.

        Optional, but it saves the page faults of fresh memory (on the 2-core
        development machine a fresh 64 MiB result costs 25 ms to fill, a
        recycled one 3.3 ms).  The tensors must not be used afterwards: reading
        ``embeddings``, ``fill_ids``, ``mrope_positions`` or ``total_tokens``
        then raises :class:`~embresume.errors.ResultReleased`.  Idempotent."""
        lease, self._lease = self._lease, None
        d = self.__dict__
        if "embeddings" in d:
            d["_released_tokens"] = int(d["embeddings"].shape[0]) if d["embeddings"] is not None else None
        for name in _TENSORS:
            d.pop(name, None)
        if lease is not None:
            lease.give_back()

    def __getattr__(self, name: str):
        # only reached when normal lookup fails: a tensor of a released result
        if name in _TENSORS and "_released_tokens" in self.__dict__:
            raise ResultReleased(f"room {self.__dict__.get('room')!r}: {name} read after release(); the result "
                                 "was released and its memory serves other requests (read the tensors, or "
                                 "copy them, before calling release())")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def released(self) -> bool:
        """True once :meth:`release` was called."""
        return "_released_tokens" in self.__dict__

    def __repr__(self) -> str:
        d = self.__dict__
        if "_released_tokens" in d:
            return f"EmbeddingResult(room={d.get('room')!r}, released)"
        e = d.get("embeddings")
        shape = tuple(e.shape) if e is not None else None
        return (f"EmbeddingResult(room={d.get('room')!r}, embeddings={shape} {getattr(e, 'dtype', '')}, "
                f"chunks={d.get('chunks')})")

    def __enter__(self) -> "EmbeddingResult":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def total_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def mrope_delta(self) -> int:
        return int(self.aux[1])

    @property
    def resumes(self) -> int:
        return self.chunks - 1


class _Lease:
    __slots__ = ("arena", "key", "buffers")

    def __init__(self, arena: "ResultArena", key, buffers):
        self.arena, self.key, self.buffers = arena, key, buffers

    def give_back(self) -> None:
        self.arena._put(self.key, self.buffers)


class ResultArena:
    """Recycled memory for merged results.

    Buffers are kept per (capacity bucket, hidden, dtype, device); a released
    result's buffers serve the next request of the same bucket, so the merge
    writes into memory that is already faulted in.  At most ``max_bytes`` are
    kept idle; a miss simply allocates.
    """

    def __init__(self, max_bytes: int = 1 << 30, block_size: int = 128):
        self.max_bytes = max_bytes
        self.block_size = block_size
        self._free: dict[tuple, list] = {}
        self._idle = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def _bucket(self, tokens: int) -> int:
        # capacity rounded up to a block, then to 1/8 steps of its power of two:
        # at most 12.5 % slack, few distinct buckets
        t = -(-tokens // self.block_size) * self.block_size
        step = max(self.block_size, 1 << max(0, t.bit_length() - 4))
        return -(-t // step) * step

    @staticmethod
    def _nbytes(key) -> int:
        cap, hidden, dtype, _ = key
        return cap * (hidden * dtype.itemsize + 16)

    def take(self, tokens: int, hidden: int, dtype: torch.dtype, device):
        """``(views, host_views, lease)``: the result tensors ``[T, hidden]``,
        ``[T]`` and ``[3, T]``; for host memory also numpy views of the same
        bytes (integers of the same width) for the copies, else None."""
        key = (self._bucket(tokens), hidden, dtype, device if type(device) is str else str(device))
        with self._lock:
            stack = self._free.get(key)
            if stack:
                self.hits += 1
                self._idle -= self._nbytes(key)
                buffers = stack.pop()
            else:
                buffers = None
                self.misses += 1
        cap = key[0]
        if buffers is None:
            e = torch.empty(cap * hidden, dtype=dtype, device=device)
            meta = torch.empty(cap * 4, dtype=torch.int32, device=device)
            buffers = (e, meta, (as_numpy(e), meta.numpy()) if e.device.type == "cpu" else None)
        e, meta, host = buffers
        # one torch op per view (as_strided, a slice): each costs microseconds on a cold cache
        views = (e.as_strided((tokens, hidden), (hidden, 1)), meta[:tokens],
                 meta.as_strided((3, tokens), (tokens, 1), cap))
        if host is not None:
            he, hm = host
            host = (he[:tokens * hidden].reshape(tokens, hidden), hm[:tokens],
                    hm[cap:cap + 3 * tokens].reshape(3, tokens))
        return views, host, _Lease(self, key, buffers)

    def _put(self, key, buffers) -> None:
        n = self._nbytes(key)
        with self._lock:
            if self._idle + n > self.max_bytes:
                return
            self._free.setdefault(key, []).append(buffers)
            self._idle += n

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._idle = 0


class MergeBuffer:
    """Destination of the chunks of one request."""

    def __init__(self, total_tokens: int, hidden: int, dtype: torch.dtype, device, aux: torch.Tensor,
                 arena: Optional[ResultArena] = None):
        self.total_tokens = total_tokens
        if arena is not None:
            (self.embeddings, self.fill_ids, self.mrope_positions), host, self.lease = arena.take(
                total_tokens, hidden, dtype, device)
        else:
            self.lease = None
            self.embeddings = torch.empty((total_tokens, hidden), dtype=dtype, device=device)
            self.fill_ids = torch.empty(total_tokens, dtype=torch.int32, device=device)
            self.mrope_positions = torch.empty((3, total_tokens), dtype=torch.int32, device=device)
            host = None
        #: where the copies write: numpy views of host buffers (no torch op per chunk), else the tensors
        self._out = host if host is not None else (self.embeddings, self.fill_ids, self.mrope_positions)
        self.aux = aux
        self.filled = 0

    def add(self, pool, blocks: Sequence[int], tokens: int) -> None:
        """Gather the next ``tokens`` tokens (a chunk or a landed part of one)."""
        if tokens <= 0 or self.filled + tokens > self.total_tokens:
            raise ValueError(f"chunk of {tokens} tokens does not fit: {self.filled}/{self.total_tokens} filled")
        need = -(-tokens // pool.layout.block_size)
        if need > len(blocks):
            raise ValueError(f"chunk of {tokens} tokens needs {need} blocks, {len(blocks)} given")
        gather_chunk(pool, blocks, tokens, *self._out, self.filled)
        self.filled += tokens

    @property
    def complete(self) -> bool:
        return self.filled == self.total_tokens

    def result(self, room: int, history: list[Status], chunks: int) -> EmbeddingResult:
        if not self.complete:
            raise ValueError(f"merge incomplete: {self.filled}/{self.total_tokens} tokens")
        return EmbeddingResult(room, self.embeddings, self.fill_ids, self.mrope_positions, self.aux,
                               chunks, list(history), self.lease)

    def discard(self) -> None:
        """The request failed: recycle the buffers at once."""
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.give_back()
