"""Routing policies: the KV-aware rule trades cached prefix tokens against load as documented."""

from __future__ import annotations

import pytest
from pagedllm.router.policy import Candidate, KVAwarePolicy, LeastLoadPolicy, RoundRobinPolicy, make_policy


def test_kv_aware_prefers_the_replica_holding_the_prefix():
    policy = KVAwarePolicy(load_cost_tokens=64)
    assert policy.choose([Candidate(0, cached_tokens=0), Candidate(1, cached_tokens=256)], 300) == 1


def test_kv_aware_moves_away_once_the_load_gap_outweighs_the_cached_tokens():
    policy = KVAwarePolicy(load_cost_tokens=64)
    # 256 cached tokens are worth 4 queued requests: 3 more is still worth it, 5 more is not.
    assert policy.choose([Candidate(0, in_flight=0), Candidate(1, cached_tokens=256, in_flight=3)], 300) == 1
    assert policy.choose([Candidate(0, in_flight=0), Candidate(1, cached_tokens=256, in_flight=5)], 300) == 0


def test_load_counts_the_engine_queue_and_a_full_cache():
    assert Candidate(0, in_flight=1, running=2, waiting=3).load == 5
    assert Candidate(0, in_flight=4, kv_usage=1.0).load == 8


def test_least_load_and_round_robin():
    least = LeastLoadPolicy()
    assert least.choose([Candidate(0, in_flight=2), Candidate(1, in_flight=1, cached_tokens=999)], 10) == 1
    rr = RoundRobinPolicy()
    picks = [rr.choose([Candidate(0), Candidate(1), Candidate(2)], 10) for _ in range(6)]
    assert picks == [0, 1, 2, 0, 1, 2]


def test_ties_are_spread_not_piled_on_one_replica():
    policy = KVAwarePolicy()
    picks = set()
    for _ in range(4):
        picks.add(policy.choose([Candidate(0), Candidate(1)], 10))
        policy.choose([Candidate(0), Candidate(1, cached_tokens=10)], 10)  # a clear winner between ties
    assert picks == {0, 1}


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="round_robin"):
        make_policy("random")
    assert make_policy("kv-aware", 10).load_cost_tokens == 10
