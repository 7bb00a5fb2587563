"""Deterministic synthetic embeddings for the demo, tests and benchmarks.

Both processes build the same random base tensor from a seed once; a room's
embedding is a slice of it chosen by the room id, so the language side can
verify every merged result bit for bit without shipping the expected data.
"""

from __future__ import annotations

import hashlib
import random

import torch

from .config import parse_dtype


class SyntheticData:
    def __init__(self, hidden: int, dtype, max_tokens: int, seed: int = 0, device: str = "cpu"):
        self.hidden = hidden
        self.dtype = parse_dtype(dtype)
        self.max_tokens = max_tokens
        g = torch.Generator().manual_seed(seed)
        n = 2 * max_tokens
        self._emb = torch.randn((n, hidden), generator=g, dtype=torch.float32).to(self.dtype)
        self._fill = torch.randint(0, 1 << 30, (n,), generator=g, dtype=torch.int32)
        self._mrope = torch.randint(0, 1 << 20, (3, n), generator=g, dtype=torch.int32)
        self._cpu = (self._emb, self._fill, self._mrope)
        if device != "cpu":  # the encoder's model output lives on the GPU
            self._emb, self._fill, self._mrope = (t.to(device) for t in self._cpu)

    @staticmethod
    def _num(room) -> int:
        """A room key (int, str or bytes) as a stable integer."""
        if isinstance(room, int):
            return room
        raw = room.encode() if isinstance(room, str) else bytes(room)
        return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")

    def _offset(self, room) -> int:
        return (self._num(room) * 2654435761) % self.max_tokens

    def delta(self, room) -> int:
        return (self._num(room) * 31) % 1000 - 500

    def sample(self, room, tokens: int):
        """(embeddings [T, H], fill_ids [T], mrope [3, T], mrope_delta) for ``room``."""
        if not 0 < tokens <= self.max_tokens:
            raise ValueError(f"tokens must be in [1, {self.max_tokens}], got {tokens}")
        o = self._offset(room)
        return (self._emb[o:o + tokens], self._fill[o:o + tokens], self._mrope[:, o:o + tokens],
                self.delta(room))

    def verify(self, room, result) -> bool:
        T = result.total_tokens
        if not 0 < T <= self.max_tokens:
            return False
        o = self._offset(room)
        e, f, m = self._cpu
        return (torch.equal(result.embeddings.cpu(), e[o:o + T]) and torch.equal(result.fill_ids.cpu(), f[o:o + T])
                and torch.equal(result.mrope_positions.cpu(), m[:, o:o + T])
                and result.mrope_delta == self.delta(room))


#: token counts a request mix must contain (relative to the default allocation)
def edge_case_tokens(default_allocate_tokens: int, block_size: int) -> list[int]:
    d = default_allocate_tokens
    return sorted({1, max(1, block_size // 2), 1024, d, d + 1, 3 * d + 5, 2 * d})


def image_token_counts(n: int, default_allocate_tokens: int, block_size: int, seed: int = 0,
                       max_tokens: int | None = None) -> list[int]:
    """A realistic mix: images at common resolutions with 28x28 patches (Qwen2-VL
    style: (h/28)*(w/28) tokens), some short videos, plus the edge cases."""
    rng = random.Random(seed)
    edges = edge_case_tokens(default_allocate_tokens, block_size)
    out = list(edges)
    sides = [224, 336, 448, 560, 672, 896, 1008, 1344, 1792, 2048]
    while len(out) < n:
        r = rng.random()
        if r < 0.8:
            h, w = rng.choice(sides), rng.choice(sides)
            t = (h // 28) * (w // 28)
        else:  # a short video: frames/2 x (h/28 x w/28)
            frames = rng.choice([4, 8, 16])
            t = frames // 2 * (rng.choice(sides[:5]) // 28) * (rng.choice(sides[:5]) // 28)
        out.append(max(1, t))
    out = out[:n] if n >= len(edges) else edges[:n]
    if max_tokens:
        out = [min(t, max_tokens) for t in out]
    rng.shuffle(out)
    return out


#: the largest count :func:`image_token_counts` draws (a 2048 x 2048 image: 73 x 73 patches)
_SIDES = [224, 336, 448, 560, 672, 896, 1008, 1344, 1792, 2048]
MAX_DRAWN_TOKENS = max((_SIDES[-1] // 28) ** 2, 16 // 2 * (_SIDES[4] // 28) ** 2)


class TokenCounts:
    """The same image/video mix as :func:`image_token_counts`, generated lazily:
    ``n`` may be 10**8 without building a list (memory stays flat).  The edge
    cases sit at seeded positions; ``len()``, ``min_tokens`` and ``max_tokens``
    are known before the first count is drawn."""

    def __init__(self, n: int, default_allocate_tokens: int, block_size: int, seed: int = 0):
        self.n = n
        self.seed = seed
        edges = edge_case_tokens(default_allocate_tokens, block_size)
        if n <= len(edges):
            self._edges = dict(enumerate(random.Random(seed).sample(edges[:n], n)))
            drawn: list[int] = []
        else:
            rng = random.Random(seed ^ 0x5EED)
            self._edges = dict(zip(rng.sample(range(n), len(edges)), edges))
            drawn = [1, MAX_DRAWN_TOKENS]
        pool = list(self._edges.values()) + drawn
        self.min_tokens, self.max_tokens = min(pool), max(pool)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = random.Random(self.seed)
        sides = _SIDES
        edges = self._edges
        for i in range(self.n):
            t = edges.get(i)
            if t is None:
                if rng.random() < 0.8:
                    t = (rng.choice(sides) // 28) * (rng.choice(sides) // 28)
                else:  # a short video: frames/2 x (h/28 x w/28)
                    frames = rng.choice([4, 8, 16])
                    t = frames // 2 * (rng.choice(sides[:5]) // 28) * (rng.choice(sides[:5]) // 28)
            yield max(1, t)
