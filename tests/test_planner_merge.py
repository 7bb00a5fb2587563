"""The resume math: planner + copies + merge, with a real allocator and pool."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from embresume.blocks import BlockAllocator, BlockLayout, BlockPool
from embresume.errors import BlockSizeMismatch, ProtocolError
from embresume.kernels import scatter_chunk
from embresume.merge import MergeBuffer
from embresume.planner import plan_chunk
from embresume.source import BlockSource, TensorSource, make_aux


def simulate(total, default_alloc, block_size, pool_blocks, hidden=8, from_blocks=False, cap=None):
    """Drive the whole protocol in memory; returns (merge buffer, source tensors, chunks)."""
    g = torch.Generator().manual_seed(total)
    emb = torch.randn(total, hidden, generator=g).to(torch.bfloat16)
    fill = torch.arange(total, dtype=torch.int32) * 3
    mrope = torch.randint(0, 999, (3, total), generator=g, dtype=torch.int32)
    if from_blocks:
        nb = -(-total // block_size)
        spool = BlockPool.create(BlockLayout(nb, block_size, hidden, torch.bfloat16))
        sblocks = list(reversed(range(nb)))       # deliberately scrambled
        for j, b in enumerate(sblocks):
            n = min(block_size, total - j * block_size)
            spool.embeddings[b, :n] = emb[j * block_size:j * block_size + n]
            spool.fill_ids[b, :n] = fill[j * block_size:j * block_size + n]
            spool.mrope[b, :, :n] = mrope[:, j * block_size:j * block_size + n]
        src = BlockSource(spool, sblocks, total, mrope_delta=-4)
    else:
        src = TensorSource(emb, fill, mrope, mrope_delta=-4)
    layout = BlockLayout(pool_blocks, block_size, hidden, torch.bfloat16)
    pool = BlockPool.create(layout)
    alloc = BlockAllocator(pool_blocks, block_size)
    room, sent, chunks, merge = 9, 0, 0, None
    want = default_alloc
    while True:
        if cap:
            want = min(want, cap)
        blocks = alloc.allocate(want, room, min_tokens=1)
        assert blocks, "the pool always has a block for a resume (it freed its own)"
        allocated = alloc.allocated_tokens(blocks)
        plan = plan_chunk(total, sent, allocated, block_size, blocks)
        assert plan.tokens == min(total - sent, allocated)
        aux = make_aux(total, src.mrope_delta, layout.aux_ints) if chunks == 0 else None
        pool.aux[blocks[0]] = -1                  # stale aux must never be trusted on resumes
        if aux is None:
            pool.aux[blocks[0], 0] = 0
        scatter_chunk(pool, plan.dst_blocks, src, plan.src_block_start, plan.tokens, aux)
        if chunks == 0:
            a = pool.aux[blocks[0]].clone()
            assert int(a[0]) == total and int(a[1]) == -4
            merge = MergeBuffer(int(a[0]), hidden, torch.bfloat16, "cpu", a)
        merge.add(pool, blocks, plan.tokens)
        alloc.free(blocks, room)
        sent = plan.sent_tokens_after
        chunks += 1
        if not plan.partial:
            break
        want = total - sent
    assert alloc.free_blocks == pool_blocks
    return merge, (emb, fill, mrope), chunks


@settings(max_examples=150, deadline=None)
@given(total=st.integers(1, 5000), default_alloc=st.integers(1, 3000), bs=st.sampled_from([1, 2, 16, 128]),
       pool_blocks=st.integers(1, 40), from_blocks=st.booleans(), cap=st.one_of(st.none(), st.integers(1, 600)))
def test_merge_equals_source(total, default_alloc, bs, pool_blocks, from_blocks, cap):
    merge, (emb, fill, mrope), chunks = simulate(total, default_alloc, bs, pool_blocks, from_blocks=from_blocks,
                                                cap=cap)
    r = merge.result(9, [], chunks)
    assert torch.equal(r.embeddings, emb) and torch.equal(r.fill_ids, fill)
    assert torch.equal(r.mrope_positions, mrope) and r.mrope_delta == -4
    assert r.chunks == chunks
    assert chunks >= -(-total // (pool_blocks * bs))          # no chunk exceeds the pool
    first = min(pool_blocks, -(-min(default_alloc, cap or default_alloc) // bs)) * bs
    assert (chunks == 1) == (total <= first)                  # resume iff the first grant was short


def test_many_resumes_with_tiny_pool():
    merge, _, chunks = simulate(total=3000, default_alloc=8192, block_size=16, pool_blocks=10)
    assert chunks == -(-3000 // 160) and merge.complete


def test_reference_example_plan():
    # 2000 tokens; the pool grants 8 blocks (1024 tokens) of the 8192 asked
    p1 = plan_chunk(2000, 0, 1024, 128, list(range(8)))
    assert (p1.tokens, p1.partial, p1.sent_tokens_after) == (1024, True, 1024)
    p2 = plan_chunk(2000, 1024, 1024, 128, list(range(8, 16)))  # 8 blocks really allocated for 976
    assert (p2.tokens, p2.partial, p2.src_block_start, len(p2.dst_blocks)) == (976, False, 8, 8)
    with pytest.raises(BlockSizeMismatch, match="block size"):
        plan_chunk(2000, 1024, 976, 128, list(range(8)))       # 976 would fail the check


@pytest.mark.parametrize("kw, field", [
    (dict(total_tokens=0), "total_tokens"),
    (dict(sent_tokens=2000), "sent_tokens"),
    (dict(sent_tokens=100), "sent_tokens"),
    (dict(allocated_tokens=0), "allocated_tokens"),
])
def test_planner_rejects(kw, field):
    args = dict(total_tokens=2000, sent_tokens=0, allocated_tokens=256, block_size=128, dst_blocks=[0, 1])
    args.update(kw)
    with pytest.raises(ProtocolError) as e:
        plan_chunk(**args)
    assert e.value.field == field
