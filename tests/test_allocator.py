import pytest
import torch
from hypothesis import given, settings, strategies as st

from embresume.blocks import BlockAllocator, BlockLayout, BlockPool
from embresume.errors import AllocatorError


def test_allocates_noncontiguous_and_reports_real_tokens():
    a = BlockAllocator(8, 128)
    x = a.allocate(300, room=1)           # 3 blocks
    y = a.allocate(128, room=2)
    a.free(x[1:2], room=1)                # leave a hole
    z = a.allocate(200, room=3)           # gets the hole back first
    assert len(x) == 3 and len(y) == 1 and len(z) == 2
    assert x[1] in z
    assert a.allocated_tokens(z) == 256   # rule 2: len(blocks) * block_size
    assert a.blocks_of(3) == sorted(z)
    assert a.owner(z[0]) == 3


def test_double_and_foreign_free_rejected_without_side_effects():
    a = BlockAllocator(4, 16)
    b = a.allocate(32, room=7)
    c = a.allocate(16, room=8)
    with pytest.raises(AllocatorError, match="owned by room 8"):
        a.free([b[0], c[0]], room=7)
    assert a.free_blocks == 1             # nothing was freed by the failed call
    a.free(b, room=7)
    with pytest.raises(AllocatorError, match="double free"):
        a.free(b[:1], room=7)
    with pytest.raises(AllocatorError, match="out of range"):
        a.free([99], room=7)
    with pytest.raises(AllocatorError, match="twice"):
        a.free([c[0], c[0]], room=8)
    a.free(c, room=8)
    assert a.free_blocks == 4 and a.rooms() == []


def test_full_pool_all_or_nothing_and_partial():
    a = BlockAllocator(4, 128)
    a.allocate(3 * 128, room=1)
    with pytest.raises(AllocatorError, match="exhausted"):
        a.allocate(512, room=2)
    got = a.allocate(8192, room=2, min_tokens=1)
    assert len(got) == 1                  # cut down to what the pool holds
    assert a.allocate(1, room=3, min_tokens=1) == []
    assert a.free_room(2) == got


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 64), st.lists(st.tuples(st.integers(1, 9), st.integers(1, 700)), max_size=40))
def test_random_alloc_free_conserves_blocks(nblocks, ops):
    a = BlockAllocator(nblocks, 64)
    held = {}
    for room, tokens in ops:
        if room in held:
            a.free(held.pop(room), room)
        else:
            got = a.allocate(tokens, room, min_tokens=1)
            if got:
                held[room] = got
        owned = [b for bs in held.values() for b in bs]
        assert len(owned) == len(set(owned))
        assert a.free_blocks + len(owned) == nblocks
    for room, bs in held.items():
        a.free(bs, room)
    assert a.free_blocks == nblocks


def test_pool_views_share_one_backing():
    layout = BlockLayout(5, 16, 24, torch.bfloat16)
    p = BlockPool.create(layout)
    assert p.embeddings.shape == (5, 16, 24) and p.embeddings.dtype == torch.bfloat16
    assert p.fill_ids.shape == (5, 16) and p.mrope.shape == (5, 3, 16) and p.aux.shape == (5, 16)
    p.aux[4, 15] = 123
    raw = p.backing.raw
    assert raw[layout.aux_offset:].view(torch.int32)[4 * 16 + 15] == 123
    for off in (layout.fill_offset, layout.mrope_offset, layout.aux_offset, layout.nbytes):
        assert off % 4096 == 0
    assert BlockLayout.from_dict(layout.to_dict()) == layout


def test_free_takes_any_int_like_block_id_and_refuses_the_rest():
    import numpy as np
    a = BlockAllocator(8, 16)
    b = a.allocate(64, room="r")
    a.free([np.int64(x) for x in b[:2]], room="r")      # numpy ints are block ids
    assert a.blocks_of("r") == sorted(b[2:])
    with pytest.raises(AllocatorError, match="not a block index"):
        a.free([float(b[2])], room="r")                 # 2.0 == 2, but it is not a block index
    with pytest.raises(AllocatorError, match="not a block index"):
        a.free(["2"], room="r")
    with pytest.raises(AllocatorError, match="double free"):
        a.free([np.int64(b[0])], room="r")
    with pytest.raises(AllocatorError, match="owned by room r"):
        a.free([b[2]], room="nobody")                   # a room that owns nothing
    assert a.blocks_of("r") == sorted(b[2:]) and a.free_blocks == 6
    a.free(b[2:], room="r")
    assert a.free_blocks == 8 and a.rooms() == []
    # the last free comes back first, in its own order (runs of blocks survive churn)
    assert [a.allocate(16, room=1)[0] for _ in range(3)] == [b[2], b[3], b[0]]
