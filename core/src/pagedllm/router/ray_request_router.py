"""A Ray Serve request router with the KV-aware rule of ``router/policy.py`` (optional extra ``pagedllm[ray]``).

Each pagedllm replica reports, through Ray Serve's routing stats, where its engine core publishes KV
events and its load; this router keeps a ``KVEventSubscriber`` per replica and ranks the candidates
by ``(prompt tokens not cached there) + L * load``. The ingress passes ``prompt_token_ids`` and
``cache_salt`` as keyword arguments of the call it routes.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from pagedllm.router.kv_index import KVEventSubscriber, prompt_block_hashes
from pagedllm.router.policy import Candidate, KVAwarePolicy

logger = logging.getLogger("pagedllm.router.ray_request_router")


class KVAwareRequestRouter(RequestRouter):
    def initialize_state(self, load_cost_tokens: float = 32.0, **kwargs: Any) -> None:
        self.policy = KVAwarePolicy(load_cost_tokens)
        self.subscribers: dict[str, KVEventSubscriber] = {}

    def _subscriber(self, replica: RunningReplica) -> KVEventSubscriber | None:
        stats = replica.routing_stats or {}
        events, snapshot = stats.get("kv_events"), stats.get("kv_snapshot")
        if not events or not snapshot:
            return None
        key = replica.replica_id.unique_id
        sub = self.subscribers.get(key)
        if sub is None or sub.endpoint != events:
            if sub is not None:
                sub.stop()
            sub = self.subscribers[key] = KVEventSubscriber(events, snapshot, name=key).start()
        return sub

    def candidate(self, i: int, replica: RunningReplica, hashes_by_bs: dict[int, list[bytes]],
                  token_ids: list[int] | None, salt: str | None) -> Candidate:
        stats = replica.routing_stats or {}
        cached = 0
        sub = self._subscriber(replica)
        if sub is not None and token_ids and sub.block_size:
            bs = sub.block_size
            if bs not in hashes_by_bs:
                hashes_by_bs[bs] = prompt_block_hashes(token_ids, bs, salt)
            cached = sub.matched_blocks(hashes_by_bs[bs]) * bs
        in_flight = self._replica_queue_len_cache.get(replica.replica_id) if hasattr(
            self, "_replica_queue_len_cache") else None
        return Candidate(i, cached, int(in_flight or stats.get("in_flight", 0)), int(stats.get("running", 0)),
                         int(stats.get("waiting", 0)), float(stats.get("kv_cache_usage", 0.0)))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        kwargs = pending_request.kwargs if pending_request is not None else {}
        token_ids, salt = kwargs.get("prompt_token_ids"), kwargs.get("cache_salt")
        hashes: dict[int, list[bytes]] = {}
        candidates = [self.candidate(i, r, hashes, token_ids, salt) for i, r in enumerate(candidate_replicas)]
        order = sorted(candidates, key=lambda c: (self.policy.cost(c, len(token_ids or ())), c.load))
        first = self.policy.choose(candidates, len(token_ids or ()))
        ranked = [candidate_replicas[first]] + [candidate_replicas[c.index] for c in order if c.index != first]
        return [[r] for r in ranked]
