"""Allocator throughput: allocate+free pairs per second against the pool size.

The pool is first half filled by other rooms (so the free stack and the
ownership tables are not trivially empty); then one room allocates and frees
``blocks`` blocks in a loop.  The rate should not depend on the pool size.
"""

from __future__ import annotations

import time
from typing import Callable

from embresume.blocks import BlockAllocator

BLOCK = 128


def allocator_ops(pool_sizes: list[int], pairs: int, blocks: int, rounds: int,
                  tick: Callable[[str], None]) -> list[dict]:
    out = []
    for nb in pool_sizes:
        a = BlockAllocator(nb, BLOCK)
        room = 1
        while a.free_blocks > nb // 2:  # half full, many owners
            a.allocate(min(blocks, a.free_blocks - nb // 2) * BLOCK, room)
            room += 1
        me = room + 1
        tokens = blocks * BLOCK
        rates = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(pairs):
                b = a.allocate(tokens, me)
                a.free(b, me)
            dt = time.perf_counter() - t0
            rates.append(pairs / dt)
        rs = sorted(rates)
        out.append({"pool_blocks": nb, "blocks_per_allocation": blocks, "pairs_per_round": pairs,
                    "rounds": rounds, "ops_per_s_samples": rates, "ops_per_s": rs[len(rs) // 2],
                    "ops_per_s_best": rs[-1], "us_per_pair": 1e6 / rs[len(rs) // 2],
                    "free_after": a.free_blocks, "prefilled_blocks": nb - a.free_blocks})
        tick(f"allocator {nb} blocks")
    return out
