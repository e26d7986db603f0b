"""Routing policies: which replica (engine core or server) gets a request.

The KV-aware rule, used by ``pagedllm router`` and by ``pagedllm serve --data-parallel-size``:

    cost(r) = (prompt tokens NOT cached on r) + load_cost_tokens * load(r)
    load(r) = max(requests in flight to r, r's running + waiting) * (1 + r's KV cache usage)

The replica with the lowest cost wins; ties go to the lower load, then round-robin. So a replica
holding the prompt's first N blocks is preferred until it has N * block_size / load_cost_tokens
more requests queued than another, and a replica whose cache is full counts each queued request
up to twice (new prompts there would evict, or wait for, blocks).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(slots=True)
class Candidate:
    """One healthy replica as the policy sees it for one request."""

    index: int
    cached_tokens: int = 0  # the prompt's leading tokens already in this replica's prefix cache
    in_flight: int = 0  # requests sent to it and not finished (as the router counts them)
    running: int = 0  # as the replica last reported
    waiting: int = 0
    kv_usage: float = 0.0  # fraction of its KV blocks in use

    @property
    def load(self) -> float:
        return max(self.in_flight, self.running + self.waiting) * (1.0 + min(1.0, max(0.0, self.kv_usage)))


class RoutingPolicy(ABC):
    name: str
    uses_prefix: bool = False  # whether choose() reads cached_tokens (the caller may skip tokenizing)

    def __init__(self) -> None:
        self._counter = itertools.count()

    def _tie_break(self, best: list[Candidate]) -> int:
        if len(best) == 1:
            return best[0].index
        return best[next(self._counter) % len(best)].index

    @abstractmethod
    def choose(self, candidates: list[Candidate], prompt_tokens: int) -> int:
        """The index of the chosen candidate's replica; ``candidates`` is non-empty."""


class RoundRobinPolicy(RoutingPolicy):
    name = "round_robin"

    def choose(self, candidates: list[Candidate], prompt_tokens: int) -> int:
        return self._tie_break(candidates)


class LeastLoadPolicy(RoutingPolicy):
    name = "least_load"

    def choose(self, candidates: list[Candidate], prompt_tokens: int) -> int:
        low = min(c.load for c in candidates)
        return self._tie_break([c for c in candidates if c.load == low])


class KVAwarePolicy(RoutingPolicy):
    name = "kv_aware"
    uses_prefix = True

    def __init__(self, load_cost_tokens: float = 32.0) -> None:
        super().__init__()
        if load_cost_tokens < 0:
            raise ValueError(f"load_cost_tokens must be >= 0, got {load_cost_tokens}")
        self.load_cost_tokens = load_cost_tokens

    def cost(self, c: Candidate, prompt_tokens: int) -> float:
        return max(0, prompt_tokens - c.cached_tokens) + self.load_cost_tokens * c.load

    def choose(self, candidates: list[Candidate], prompt_tokens: int) -> int:
        costs = [(self.cost(c, prompt_tokens), c.load) for c in candidates]
        low = min(costs)
        return self._tie_break([c for c, k in zip(candidates, costs) if k == low])


POLICIES = {p.name: p for p in (RoundRobinPolicy, LeastLoadPolicy, KVAwarePolicy)}


def make_policy(name: str, load_cost_tokens: float = 32.0) -> RoutingPolicy:
    key = name.replace("-", "_")
    if key not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}")
    return KVAwarePolicy(load_cost_tokens) if key == "kv_aware" else POLICIES[key]()
