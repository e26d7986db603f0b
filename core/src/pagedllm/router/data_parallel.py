"""Data parallelism in one server: N engine-core processes behind one API server, routed by KV events and load.

``DataParallelLLM`` offers the ``AsyncLLM`` surface the OpenAI app uses. Each rank is an ``AsyncLLM``
with its own engine process (on CPU the cores are split between them); each core publishes KV events
(to ``--kv-events-config``'s endpoints offset by rank, or to private ipc sockets) that a subscriber per
rank turns into a cache view; the KV-aware rule of ``router/policy.py`` picks the rank. Metrics carry a
``data_parallel_rank`` label; the server is dead (and /health 503) as soon as any core dies.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from pagedllm.config import EngineConfig, KVEventsConfig
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.core_client import EngineCoreClient
from pagedllm.engine.kv_event_publisher import offset_endpoint
from pagedllm.errors import EngineDeadError, InvalidRequestError
from pagedllm.metrics import ServerMetrics
from pagedllm.outputs import RequestOutput
from pagedllm.router.kv_index import KVEventSubscriber, prompt_block_hashes
from pagedllm.router.policy import Candidate, RoutingPolicy, make_policy
from pagedllm.sample.sampling_params import SamplingParams

logger = logging.getLogger("pagedllm.router.data_parallel")


class _RankLabelledCollector:
    """Every rank's metrics in one exposition, each sample labelled with its data_parallel_rank."""

    def __init__(self, ranks: list[ServerMetrics]) -> None:
        self.ranks = ranks

    def collect(self):
        merged: dict[str, Metric] = {}
        for rank, metrics in enumerate(self.ranks):
            for family in metrics.registry.collect():
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for s in family.samples:
                    out.add_sample(s.name, {**s.labels, "data_parallel_rank": str(rank)}, s.value, s.timestamp,
                                   s.exemplar)
        yield from merged.values()


class DataParallelMetrics:
    """What the app reads from ``engine.metrics``: a registry (here, the ranks' merged)."""

    def __init__(self, model_name: str, ranks: list[AsyncLLM]) -> None:
        self.model_name = model_name
        for r in ranks:
            r.metrics = ServerMetrics(model_name)
        self.registry = CollectorRegistry()
        self.registry.register(_RankLabelledCollector([r.metrics for r in ranks]))


def split_cpu_threads(dp_size: int) -> int:
    """Threads per engine core when ``dp_size`` cores share this machine's CPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // dp_size)


class DataParallelLLM:
    def __init__(self, ranks: list[AsyncLLM], subscribers: list[KVEventSubscriber], policy: RoutingPolicy,
                 tmpdir: str | None = None) -> None:
        self.ranks = ranks
        self.subscribers = subscribers
        self.policy = policy
        self._tmpdir = tmpdir
        first = ranks[0]
        self.config = first.config
        self.tokenizer_info = first.tokenizer_info
        self.tokenizer = first.tokenizer
        self.max_model_len = min(r.max_model_len for r in ranks)
        self.input_processor = first.input_processor
        self.block_size = int(first.config.cache.block_size)
        self._metrics: DataParallelMetrics | None = None
        self._owner: dict[str, int] = {}  # request id -> rank
        self.routed = [0] * len(ranks)

    @classmethod
    async def from_config(cls, config: EngineConfig, dp_size: int, *, max_waiting_requests: int | None = None,
                          policy: str = "kv_aware", load_cost_tokens: float = 32.0,
                          startup_timeout_s: float = 900.0) -> DataParallelLLM:
        if dp_size < 2:
            raise InvalidRequestError(f"--data-parallel-size must be >= 2 here, got {dp_size}")
        user_events = config.kv_events if config.kv_events and config.kv_events.enable_kv_cache_events else None
        tmpdir = None if user_events else tempfile.mkdtemp(prefix="pagedllm-dp-")
        threads = str(split_cpu_threads(dp_size))
        env = {"PAGEDLLM_CPU_THREADS": os.environ.get("PAGEDLLM_CPU_THREADS", threads),
               "OMP_NUM_THREADS": os.environ.get("PAGEDLLM_CPU_THREADS", threads)}
        clients, subs = [], []
        for rank in range(dp_size):
            cfg = copy.deepcopy(config)
            if user_events:
                ev = copy.copy(user_events)
                ev.endpoint = offset_endpoint(user_events.endpoint, rank)
                ev.snapshot_endpoint = offset_endpoint(user_events.snapshot_endpoint, rank)
            else:
                ev = KVEventsConfig(enable_kv_cache_events=True, endpoint=f"ipc://{tmpdir}/events-{rank}",
                                    snapshot_endpoint=f"ipc://{tmpdir}/snapshot-{rank}")
            cfg.kv_events = ev
            clients.append(EngineCoreClient(cfg, env=env))
            # A wildcard bind address is not a connect address: subscribe over loopback.
            connect = lambda e: e.replace("tcp://*:", "tcp://127.0.0.1:").replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")  # noqa: E731
            subs.append(KVEventSubscriber(connect(ev.endpoint), connect(ev.snapshot_endpoint), topic=ev.topic,
                                          name=f"dp rank {rank}"))
        try:
            readies = await asyncio.gather(*(c.start(timeout_s=startup_timeout_s) for c in clients))
            ranks = [AsyncLLM(c, ready, max_waiting_requests=max_waiting_requests) for c, ready in zip(clients, readies)]
        except BaseException:
            for c in clients:
                c.shutdown()
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        for r in ranks:
            r.start()
        for s in subs:
            s.start()
        logger.info("data parallel: %d engine cores, %s threads each", dp_size, env["PAGEDLLM_CPU_THREADS"])
        return cls(ranks, subs, make_policy(policy, load_cost_tokens), tmpdir)

    # --- the AsyncLLM surface the app uses ---------------------------------------------------------
    @property
    def metrics(self) -> DataParallelMetrics | None:
        return self._metrics

    @metrics.setter
    def metrics(self, value: Any) -> None:
        name = value.model_name if value is not None else "pagedllm"
        self._metrics = DataParallelMetrics(name, self.ranks)

    @property
    def is_dead(self) -> bool:
        return any(r.is_dead for r in self.ranks)

    @property
    def draining(self) -> bool:
        return any(r.draining for r in self.ranks)

    @draining.setter
    def draining(self, value: bool) -> None:
        for r in self.ranks:
            r.draining = value

    @property
    def num_in_flight(self) -> int:
        return sum(r.num_in_flight for r in self.ranks)

    def on_dead(self, callback: Callable[[EngineDeadError], None]) -> None:
        for r in self.ranks:
            r.on_dead(callback)

    def choose_rank(self, token_ids: list[int] | None, cache_salt: str | None) -> int:
        hashes = prompt_block_hashes(token_ids, self.block_size, cache_salt) if token_ids else []
        candidates = []
        for i, (r, sub) in enumerate(zip(self.ranks, self.subscribers)):
            if r.is_dead:
                continue
            s = r.latest_stats
            cached = sub.matched_blocks(hashes) * self.block_size if hashes else 0
            candidates.append(Candidate(i, cached, r.num_in_flight, s.num_running, s.num_waiting, s.kv_cache_usage))
        if not candidates:
            raise EngineDeadError("every engine core is dead")
        return self.policy.choose(candidates, len(token_ids or ()))

    def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str, *,
                 arrival_time: float | None = None, priority: int = 0,
                 cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        token_ids = None
        if self.policy.uses_prefix:
            token_ids = self.input_processor.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        rank = self.choose_rank(token_ids, cache_salt)
        stream = self.ranks[rank].generate(prompt, params, request_id, arrival_time=arrival_time,
                                           priority=priority, cache_salt=cache_salt)
        self._owner[request_id] = rank
        self.routed[rank] += 1
        return self._release(request_id, stream)

    async def _release(self, request_id: str, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        try:
            async for out in stream:
                yield out
        finally:
            self._owner.pop(request_id, None)
            await stream.aclose()

    def abort(self, request_id: str) -> None:
        rank = self._owner.get(request_id)
        if rank is not None:
            self.ranks[rank].abort(request_id)

    def abort_all(self) -> None:
        for r in self.ranks:
            r.abort_all()

    async def fresh_stats(self, timeout_s: float = 1.0) -> list:
        return list(await asyncio.gather(*(r.fresh_stats(timeout_s) for r in self.ranks)))

    async def shutdown(self) -> None:
        await asyncio.gather(*(r.shutdown() for r in self.ranks))
        for s in self.subscribers:
            await asyncio.to_thread(s.stop)
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
