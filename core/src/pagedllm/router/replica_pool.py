"""The replicas behind a router: their URLs, health, load as last reported, and KV cache views."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import httpx

from pagedllm.router.kv_index import KVEventSubscriber, prompt_block_hashes
from pagedllm.router.policy import Candidate

logger = logging.getLogger("pagedllm.router.replica_pool")


@dataclass(slots=True)
class ReplicaSpec:
    """``URL[,events=ENDPOINT,snapshot=ENDPOINT]`` on the command line."""

    url: str
    events: str | None = None
    snapshot: str | None = None

    @classmethod
    def parse(cls, text: str) -> ReplicaSpec:
        url, *opts = [p.strip() for p in text.split(",")]
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"replica {text!r}: the first field must be an http(s) URL")
        spec = cls(url.rstrip("/"))
        for opt in opts:
            key, sep, value = opt.partition("=")
            if not sep or key not in ("events", "snapshot") or not value:
                raise ValueError(f"replica {text!r}: options are events=ENDPOINT and snapshot=ENDPOINT, got {opt!r}")
            setattr(spec, key, value)
        if (spec.events is None) != (spec.snapshot is None):
            raise ValueError(f"replica {text!r}: give both events= and snapshot= (or neither)")
        return spec


@dataclass(slots=True, eq=False)
class Replica:
    spec: ReplicaSpec
    index: int
    healthy: bool = False
    in_flight: int = 0
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    routed: int = 0
    last_error: str = ""
    last_check: float = 0.0
    kv: KVEventSubscriber | None = None
    _hash_cache: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.spec.url

    def cached_tokens(self, token_ids: list[int] | None, cache_salt: str | None) -> int:
        if token_ids is None or self.kv is None or not self.kv.synced or not self.kv.block_size:
            return 0
        bs = self.kv.block_size
        return self.kv.matched_blocks(prompt_block_hashes(token_ids, bs, cache_salt)) * bs

    def candidate(self, token_ids: list[int] | None, cache_salt: str | None) -> Candidate:
        return Candidate(self.index, self.cached_tokens(token_ids, cache_salt), self.in_flight,
                         self.running, self.waiting, self.kv_usage)


def _metric(text: str, name: str) -> float | None:
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else None


class ReplicaPool:
    """Health checks every ``health_interval_s``: a replica whose /health fails (or that refuses a
    connection) leaves the rotation at once and comes back on its next 200."""

    def __init__(self, specs: list[ReplicaSpec], health_interval_s: float = 2.0) -> None:
        if not specs:
            raise ValueError("a router needs at least one replica")
        self.replicas = [Replica(spec, i) for i, spec in enumerate(specs)]
        self.health_interval_s = health_interval_s
        self._task: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None

    def start_kv_subscribers(self) -> None:
        for r in self.replicas:
            if r.spec.events is not None:
                r.kv = KVEventSubscriber(r.spec.events, r.spec.snapshot, name=r.url).start()

    def healthy(self, exclude: set[int] = frozenset()) -> list[Replica]:
        return [r for r in self.replicas if r.healthy and r.index not in exclude]

    def mark_down(self, replica: Replica, reason: str) -> None:
        if replica.healthy:
            logger.warning("replica %s is down: %s", replica.url, reason)
        replica.healthy = False
        replica.last_error = reason

    async def check(self, replica: Replica) -> None:
        assert self._client is not None
        timeout = max(0.5, self.health_interval_s)
        try:
            r = await self._client.get(f"{replica.url}/health", timeout=timeout)
            ok = r.status_code == 200
            reason = "" if ok else f"/health answered {r.status_code}"
            if ok:
                m = await self._client.get(f"{replica.url}/metrics", timeout=timeout)
                if m.status_code == 200:
                    replica.running = int(_metric(m.text, "pagedllm:num_requests_running") or 0)
                    replica.waiting = int(_metric(m.text, "pagedllm:num_requests_waiting") or 0)
                    replica.kv_usage = float(_metric(m.text, "pagedllm:kv_cache_usage_perc") or 0.0)
        except httpx.HTTPError as exc:
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        replica.last_check = time.monotonic()
        if ok and not replica.healthy:
            logger.info("replica %s is up", replica.url)
            replica.healthy, replica.last_error = True, ""
        elif not ok:
            self.mark_down(replica, reason)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in self.replicas))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_all()

    async def start(self) -> None:
        self._client = httpx.AsyncClient()
        self.start_kv_subscribers()
        await self.check_all()
        self._task = asyncio.create_task(self._loop(), name="pagedllm-router-health")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # the cancellation we just asked for
                await self._task
        if self._client is not None:
            await self._client.aclose()
        for r in self.replicas:
            if r.kv is not None:
                await asyncio.to_thread(r.kv.stop)

    def status(self) -> list[dict]:
        return [
            {"url": r.url, "healthy": r.healthy, "in_flight": r.in_flight, "running": r.running,
             "waiting": r.waiting, "kv_cache_usage": r.kv_usage, "routed": r.routed, "last_error": r.last_error,
             "kv_events": None if r.kv is None else {
                 "synced": r.kv.synced, "seq": r.kv.seq, "cached_blocks": len(r.kv.view.blocks),
                 "resyncs": r.kv.num_resyncs, "gaps": r.kv.num_gaps}}
            for r in self.replicas
        ]
