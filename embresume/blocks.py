"""Block pools and the block allocator.

A pool holds ``num_blocks`` blocks of ``block_size`` tokens.  All four buffer
kinds live in **one** backing allocation (one shm segment, one cudaMalloc, one
Mooncake registration, one CUDA IPC handle), at 4 KiB aligned offsets::

    offset 0         embeddings  [num_blocks, block_size, hidden]   dtype
    emb_bytes (al.)  fill_ids    [num_blocks, block_size]           int32
    ...              mrope       [num_blocks, 3, block_size]        int32
    ...              aux         [num_blocks, aux_ints]             int32
    nbytes (al.)

``aux[0]`` of a request's first block holds the request's total token count,
``aux[1]`` its mrope position delta.  Only the first block of the first chunk
carries a valid record (see DESIGN.md, rule 3).

The allocator hands out arbitrary (non-contiguous) blocks from a free stack in
O(1) per block and records which room owns each block.
"""

from __future__ import annotations

import operator
import threading
from array import array
from dataclasses import dataclass
from typing import Iterable, Optional, Protocol, Sequence

import torch

from .errors import AllocatorError, ConfigError

ALIGN = 4096

_DTYPE_NAMES = {
    torch.bfloat16: "bfloat16", torch.float16: "float16",
    torch.float32: "float32", torch.float64: "float64",
}
_NAMES_DTYPE = {v: k for k, v in _DTYPE_NAMES.items()}


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ConfigError(f"unsupported embedding dtype {dtype}") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _NAMES_DTYPE[name]
    except KeyError:
        raise ConfigError(f"unsupported embedding dtype name {name!r}") from None


@dataclass(frozen=True)
class BlockLayout:
    """Geometry of a block pool; identical on both sides of a connection."""

    num_blocks: int
    block_size: int
    hidden: int
    dtype: torch.dtype
    aux_ints: int = 16

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "hidden", "aux_ints"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"BlockLayout.{name} must be a positive int, got {v!r}")
        dtype_name(self.dtype)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def emb_block_bytes(self) -> int:
        return self.block_size * self.hidden * self.itemsize

    @property
    def emb_row_bytes(self) -> int:
        return self.hidden * self.itemsize

    @property
    def emb_offset(self) -> int:
        return 0

    @property
    def fill_offset(self) -> int:
        return _align(self.num_blocks * self.emb_block_bytes)

    @property
    def mrope_offset(self) -> int:
        return self.fill_offset + _align(self.num_blocks * self.block_size * 4)

    @property
    def aux_offset(self) -> int:
        return self.mrope_offset + _align(self.num_blocks * 3 * self.block_size * 4)

    @property
    def nbytes(self) -> int:
        return self.aux_offset + _align(self.num_blocks * self.aux_ints * 4)

    def to_dict(self) -> dict:
        return {
            "num_blocks": self.num_blocks, "block_size": self.block_size, "hidden": self.hidden,
            "dtype": dtype_name(self.dtype), "aux_ints": self.aux_ints,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "BlockLayout":
        try:
            return cls(int(d["num_blocks"]), int(d["block_size"]), int(d["hidden"]),
                       dtype_from_name(d["dtype"]), int(d.get("aux_ints", 16)))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"bad block layout description {d!r}: {e}") from None


class Backing(Protocol):
    """Memory behind a pool: ``raw`` is a uint8 tensor of ``layout.nbytes``."""

    raw: torch.Tensor

    def close(self) -> None: ...


class TorchBacking:
    """Plain (process-private) torch memory, CPU or GPU."""

    def __init__(self, nbytes: int, device: str = "cpu"):
        self.raw = torch.zeros(nbytes, dtype=torch.uint8, device=device)

    def close(self) -> None:
        self.raw = torch.empty(0, dtype=torch.uint8)


class BlockPool:
    """Typed views of the four buffers of a pool over one backing allocation."""

    def __init__(self, layout: BlockLayout, backing: Backing):
        if backing.raw.numel() < layout.nbytes:
            raise ConfigError(f"backing of {backing.raw.numel()} bytes is smaller than the layout's {layout.nbytes}")
        self.layout = layout
        self.backing = backing
        raw = backing.raw
        L = layout
        self.embeddings = raw[L.emb_offset:L.emb_offset + L.num_blocks * L.emb_block_bytes] \
            .view(L.dtype).view(L.num_blocks, L.block_size, L.hidden)
        self.fill_ids = raw[L.fill_offset:L.fill_offset + L.num_blocks * L.block_size * 4] \
            .view(torch.int32).view(L.num_blocks, L.block_size)
        self.mrope = raw[L.mrope_offset:L.mrope_offset + L.num_blocks * 3 * L.block_size * 4] \
            .view(torch.int32).view(L.num_blocks, 3, L.block_size)
        self.aux = raw[L.aux_offset:L.aux_offset + L.num_blocks * L.aux_ints * 4] \
            .view(torch.int32).view(L.num_blocks, L.aux_ints)
        #: plain attributes, read once: a torch attribute read costs microseconds
        #: on a cold cache, and the hot path asks for them on every chunk
        self.device: torch.device = raw.device
        self.is_cuda: bool = raw.is_cuda

    @classmethod
    def create(cls, layout: BlockLayout, device: str = "cpu") -> "BlockPool":
        return cls(layout, TorchBacking(layout.nbytes, device))

    def data_ptr(self) -> int:
        return self.backing.raw.data_ptr()

    def close(self) -> None:
        # drop every view we made (the numpy ones of kernels.cpu.pool_arrays
        # too): shared memory is freed once no live result still views it,
        # even while someone keeps this closed pool object
        for name in ("embeddings", "fill_ids", "mrope", "aux"):
            setattr(self, name, None)
        self.__dict__.pop("_np_views", None)
        self.backing.close()


class BlockAllocator:
    """O(1) allocator of pool blocks with per-room ownership.

    ``allocate`` pops block ids from a free stack, ``free`` pushes them back
    after checking that every block is owned by the freeing room — a double
    free or a free of another room's block raises :class:`AllocatorError` and
    changes nothing.  Thread-safe.

    Ownership is one set of blocks per room.  Allocating and freeing a room's
    blocks are set operations that run in C (no Python loop per block: a
    1-token request of the default 64-block allocation spent 12 us here per
    round trip hot, 35 us with cold caches); only a free that fails its checks
    walks the blocks, to say precisely what is wrong.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ConfigError("allocator needs positive num_blocks and block_size")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # reversed so that a fresh allocator hands out 0, 1, 2, ...
        self._free = list(range(num_blocks - 1, -1, -1))
        self._by_room: dict = {}
        self._lock = threading.Lock()

    # -- queries -------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for_tokens(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocated_tokens(self, blocks: Sequence[int]) -> int:
        """Rule 2: what was really allocated, never the configured default."""
        return len(blocks) * self.block_size

    def owner(self, block: int) -> Optional[int]:
        with self._lock:
            for room, owned in self._by_room.items():
                if block in owned:
                    return room
        return None

    def blocks_of(self, room: int) -> list[int]:
        with self._lock:
            return sorted(self._by_room.get(room, ()))

    def rooms(self) -> list[int]:
        with self._lock:
            return list(self._by_room)

    # -- operations ----------------------------------------------------
    def allocate(self, tokens: int, room, *, min_tokens: Optional[int] = None) -> list[int]:
        """Allocate blocks for ``tokens`` tokens for ``room``.

        With ``min_tokens`` the allocation may be cut down to what the pool
        holds, as long as at least ``min_tokens`` worth of blocks fit; it
        returns ``[]`` if not even that fits.  Without it the call is
        all-or-nothing and raises :class:`AllocatorError` when the pool is short.
        """
        if type(tokens) is not int or tokens <= 0:
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
                raise AllocatorError(f"cannot allocate {tokens!r} tokens")
        want = -(-tokens // self.block_size)
        with self._lock:
            free = self._free
            n = want
            if n > len(free):
                if min_tokens is None:
                    raise AllocatorError(f"pool exhausted: room {room} wants {want} blocks, {len(free)} free")
                n = len(free)
                if n < max(1, self.blocks_for_tokens(min_tokens)):
                    return []
            if n == 0:
                return []
            blocks = free[-n:]
            del free[-n:]
            blocks.reverse()
            owned = self._by_room.get(room)
            if owned is None:
                self._by_room[room] = set(blocks)
            else:
                owned.update(blocks)
            return blocks

    def free(self, blocks: Iterable[int], room: int) -> None:
        blocks = list(blocks)
        if not blocks:
            return
        try:
            ints = array("q", blocks).tolist()  # C-level: refuses floats, strings, None
        except (TypeError, OverflowError):
            ints = None
        with self._lock:
            owned = self._by_room.get(room)
            if ints is not None and owned is not None:
                s = set(ints)
                if len(s) == len(ints) and s <= owned:
                    owned -= s
                    # pushed in reverse so the next allocation pops them in the same order:
                    # runs of consecutive blocks survive churn (one big copy per run, zero-copy views)
                    self._free.extend(reversed(ints))
                    if not owned:
                        del self._by_room[room]
                    return
            self._free_error(blocks, room)

    def _free_error(self, blocks: list, room) -> None:
        """(lock held) The precise reason a free was refused (it changed nothing)."""
        seen = set()
        for x in blocks:
            try:
                b = operator.index(x)
            except TypeError:
                raise AllocatorError(f"block {x!r} is not a block index") from None
            if not 0 <= b < self.num_blocks:
                raise AllocatorError(f"block {b!r} is out of range [0, {self.num_blocks})")
            if b in seen:
                raise AllocatorError(f"block {b} listed twice in one free")
            seen.add(b)
            if b in self._by_room.get(room, ()):
                continue
            for other, owned in self._by_room.items():
                if b in owned:
                    raise AllocatorError(f"room {room} frees block {b} owned by room {other}")
            raise AllocatorError(f"double free of block {b} by room {room}")
        raise AllocatorError(f"room {room} cannot free {blocks!r}")  # pragma: no cover - unreachable

    def free_room(self, room: int) -> list[int]:
        """Free every block ``room`` still owns; returns them."""
        with self._lock:
            blocks = sorted(self._by_room.get(room, ()))
        self.free(blocks, room)
        return blocks
