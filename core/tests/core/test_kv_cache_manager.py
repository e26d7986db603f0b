"""KVCacheManager and BlockPool: ref counts, LRU eviction, verified prefix hits, copy-on-write, waste."""

from __future__ import annotations

import pytest
from pagedllm.core.block_pool import BlockPool, hash_block
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Sequence
from pagedllm.sample.sampling_params import SamplingParams


def make_seq(tokens: list[int], salt: str | None = None, **params) -> Sequence:
    return Sequence(
        request_id=f"r{len(tokens)}",
        index=0,
        token_ids=list(tokens),
        num_prompt_tokens=len(tokens),
        params=SamplingParams(**params),
        arrival_time=0.0,
        cache_salt=salt,
    )


def compute(kv: KVCacheManager, seq: Sequence, n: int | None = None) -> list[tuple[int, int]]:
    """Allocate and pretend the forward ran: what the scheduler + runner do for one step."""
    n = seq.num_tokens - seq.num_computed_tokens if n is None else n
    pairs = kv.allocate_slots(seq, n)
    assert pairs is not None
    seq.num_computed_tokens += n
    kv.cache_full_blocks(seq)
    return pairs


def admit(kv: KVCacheManager, seq: Sequence) -> int:
    hits, num_hit = kv.get_computed_blocks(seq)
    pairs = kv.allocate_slots(seq, seq.num_tokens - num_hit, hits)
    assert pairs == []
    kv.record_lookup(seq.num_tokens, num_hit)
    seq.num_computed_tokens = seq.num_tokens
    kv.cache_full_blocks(seq)
    return num_hit


def test_ref_counts_follow_sharing_and_freeing():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(9)))
    admit(kv, a)
    assert [kv.pool.blocks[i].ref_count for i in kv.block_ids(a)] == [1, 1, 1]
    b = make_seq(list(range(9)))
    assert admit(kv, b) == 8  # two full blocks hit; the partial third block is private
    shared = kv.block_ids(a)[:2]
    assert kv.block_ids(b)[:2] == shared
    assert [kv.pool.blocks[i].ref_count for i in shared] == [2, 2]
    kv.free(a)
    assert [kv.pool.blocks[i].ref_count for i in shared] == [1, 1]
    kv.free(b)
    assert kv.pool.num_free_blocks == 8 and kv.pool.num_used_blocks == 0


def test_free_queue_evicts_least_recently_used_cached_block_first():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(3)
    for i, b in enumerate(blocks):
        h, key = hash_block(None, [i])
        pool.cache_block(b, h, key)
    pool.free_blocks([blocks[1]])
    pool.free_blocks([blocks[0]])
    pool.free_blocks([blocks[2]])
    # The never-cached block 3 goes first, then cached ones in the order they were freed.
    order = [pool.get_new_blocks(1)[0].block_id for _ in range(4)]
    assert order == [3, blocks[1].block_id, blocks[0].block_id, blocks[2].block_id]
    assert pool.num_cached_blocks == 0 and pool.num_evictions == 3


def test_freed_uncached_block_is_reused_before_cached_ones():
    pool = BlockPool(3)
    cached, plain = pool.get_new_blocks(2)
    h, key = hash_block(None, [7])
    pool.cache_block(cached, h, key)
    pool.free_blocks([cached, plain])
    assert pool.get_new_blocks(1)[0] is pool.blocks[plain.block_id]
    assert pool.num_cached_blocks == 1


def test_touching_a_cached_free_block_takes_it_out_of_the_free_queue():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3])
    admit(kv, a)
    kv.free(a)
    assert kv.pool.num_free_blocks == 4
    b = make_seq([1, 2, 3])
    assert admit(kv, b) == 2
    assert kv.pool.num_free_blocks == 2


def test_prefix_hit_is_verified_against_stored_tokens():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a = make_seq([1, 2, 3])
    admit(kv, a)
    block = kv.pool.blocks[kv.block_ids(a)[0]]
    # Simulate a hash collision: same digest, different stored contents.
    _, other_key = hash_block(None, [9, 9])
    block.hash_key = other_key
    b = make_seq([1, 2, 3])
    assert admit(kv, b) == 0


def test_partial_blocks_are_never_cached():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_seq([1, 2, 3, 4, 5, 6])
    admit(kv, a)
    assert kv.pool.num_cached_blocks == 1
    b = make_seq([1, 2, 3, 4, 5, 6, 7])
    assert admit(kv, b) == 4


def test_last_token_is_always_recomputed_even_on_a_full_hit():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(8)))
    admit(kv, a)
    assert kv.pool.num_cached_blocks == 2
    b = make_seq(list(range(8)))
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 4 and len(hits) == 1  # block-aligned prompt: last block recomputed


def test_cache_salt_separates_prefixes():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    admit(kv, make_seq([1, 2, 3], salt="tenant-a"))
    assert admit(kv, make_seq([1, 2, 3], salt="tenant-b")) == 0
    assert admit(kv, make_seq([1, 2, 3], salt="tenant-a")) == 2


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    admit(kv, make_seq([1, 2, 3]))
    assert admit(kv, make_seq([1, 2, 3])) == 0
    assert kv.pool.num_cached_blocks == 0 and kv.usage().prefix_queries == 0


def test_prefix_hit_rate_counts_tokens():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    admit(kv, make_seq([1, 2, 3, 4, 5]))
    admit(kv, make_seq([1, 2, 3, 4, 5]))
    u = kv.usage()
    assert (u.prefix_queries, u.prefix_hits) == (10, 4)
    assert u.prefix_hit_rate == pytest.approx(0.4)


def test_fork_shares_blocks_and_copies_partial_block_on_write():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = make_seq([1, 2, 3, 4, 5, 6])
    admit(kv, parent)
    child = make_seq([1, 2, 3, 4, 5, 6])
    kv.fork(parent, child)
    child.num_computed_tokens = parent.num_computed_tokens
    full, partial = kv.block_ids(parent)
    assert kv.pool.blocks[partial].ref_count == 2
    child.append_token(7)
    pairs = compute(kv, child)
    assert len(pairs) == 1 and pairs[0][0] == partial
    assert kv.block_ids(child)[0] == full and kv.block_ids(child)[1] == pairs[0][1]
    assert kv.pool.blocks[partial].ref_count == 1
    # The last sharer writes in place: no copy needed any more.
    parent.append_token(8)
    assert compute(kv, parent) == []


def test_fork_at_block_boundary_needs_no_copy():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = make_seq([1, 2, 3, 4])
    admit(kv, parent)
    child = make_seq([1, 2, 3, 4])
    kv.fork(parent, child)
    child.num_computed_tokens = 4
    child.append_token(5)
    assert compute(kv, child) == []
    assert len(kv.block_ids(child)) == 2


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    a = make_seq([1, 2, 3])
    admit(kv, a)
    b = make_seq([5, 6, 7, 8])
    assert kv.allocate_slots(b, 4) is None
    assert kv.pool.num_free_blocks == 1 and kv.block_ids(b) == []


def test_waste_counts_unfilled_slots_of_allocated_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    admit(kv, make_seq([1, 2, 3, 4, 5]))  # 2 blocks, 5 tokens
    admit(kv, make_seq([9, 9, 9, 9, 9, 9, 9]))  # 2 blocks, 7 tokens
    u = kv.usage()
    assert u.num_used_blocks == 4 and u.waste == pytest.approx(4 / 16)
    assert u.usage == pytest.approx(0.5)


def test_freeing_everything_returns_every_block():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    seqs = [make_seq([i, i + 1, i + 2]) for i in range(3)]
    for s in seqs:
        admit(kv, s)
    assert kv.pool.num_free_blocks == 0
    for s in seqs:
        kv.free(s)
    assert kv.pool.num_free_blocks == 6 and kv.tables == {}
    assert all(b.ref_count == 0 for b in kv.pool.blocks)


def test_double_free_of_a_block_is_an_error():
    pool = BlockPool(2)
    (b,) = pool.get_new_blocks(1)
    pool.free_blocks([b])
    with pytest.raises(RuntimeError):
        pool.free_blocks([b])
