"""Prometheus metrics (vLLM names, prefix ``pagedllm:``) and the periodic engine log line."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pagedllm.engine.types import EngineCoreStats

logger = logging.getLogger("pagedllm.metrics")

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort", "error")


class ServerMetrics:
    """Every metric of one server, in its own CollectorRegistry (no global state between apps)."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"pagedllm:{name}", doc, labels, registry=r)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"pagedllm:{name}", doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"pagedllm:{name}", doc, labels, buckets=buckets, registry=r)

        self.num_requests_running = gauge("num_requests_running", "Requests in the engine's running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "KV-cache usage: 1 means every block in use.")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.num_preemptions = counter("num_preemptions", "Preemptions (recompute) in the engine.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens computed (prefill).")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.request_success = Counter(
            "pagedllm:request_success",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Arrival to first generated token.", _LATENCY_BUCKETS
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between consecutive generated tokens.", _ITL_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Arrival to finish of a request.", _E2E_BUCKETS
        )
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Arrival to the start of the step that first served it.", _E2E_BUCKETS
        )
        for reason in FINISH_REASONS:
            self.request_success.labels(model_name, reason)  # export zeros so dashboards see the series
        self._last: EngineCoreStats | None = None

    def _l(self, metric):  # the labelled child for this server's model
        return metric.labels(self.model_name)

    def observe_engine_stats(self, stats: EngineCoreStats) -> None:
        """Set gauges and advance counters by the change in the engine's cumulative figures."""
        self._l(self.num_requests_running).set(stats.num_running)
        self._l(self.num_requests_waiting).set(stats.num_waiting)
        self._l(self.kv_cache_usage_perc).set(stats.kv_cache_usage)
        last = self._last
        for name, metric in (
            ("prefix_cache_queries", self.prefix_cache_queries),
            ("prefix_cache_hits", self.prefix_cache_hits),
            ("num_preemptions", self.num_preemptions),
            ("prompt_tokens", self.prompt_tokens),
            ("generation_tokens", self.generation_tokens),
        ):
            delta = getattr(stats, name) - (getattr(last, name) if last is not None else 0)
            if delta > 0:
                self._l(metric).inc(delta)
        self._last = stats

    def observe_first_token(self, ttft_s: float, queue_time_s: float | None) -> None:
        self._l(self.time_to_first_token).observe(max(0.0, ttft_s))
        if queue_time_s is not None:
            self._l(self.request_queue_time).observe(max(0.0, queue_time_s))

    def observe_inter_token(self, interval_s: float, num_tokens: int) -> None:
        """One observation per new token: a step that produced k tokens spread its interval over them."""
        per_token = max(0.0, interval_s) / max(1, num_tokens)
        for _ in range(num_tokens):
            self._l(self.inter_token_latency).observe(per_token)

    def observe_finished(self, finish_reason: str | None, e2e_s: float) -> None:
        reason = finish_reason if finish_reason in FINISH_REASONS else "stop"
        self.request_success.labels(self.model_name, reason).inc()
        self._l(self.e2e_request_latency).observe(max(0.0, e2e_s))


class StatLogger:
    """The periodic log line: throughput since the last line, batch, queue, KV usage, prefix hits."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last_stats: EngineCoreStats | None = None
        self._last_time = time.monotonic()

    def format_line(self, stats: EngineCoreStats, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = max(1e-9, now - self._last_time)
        last = self._last_stats or EngineCoreStats()
        prompt_tps = (stats.prompt_tokens - last.prompt_tokens) / elapsed
        gen_tps = (stats.generation_tokens - last.generation_tokens) / elapsed
        queries = stats.prefix_cache_queries - last.prefix_cache_queries
        hits = stats.prefix_cache_hits - last.prefix_cache_hits
        hit_rate = 100.0 * hits / queries if queries > 0 else 0.0
        self._last_stats, self._last_time = stats, now
        return (
            f"Avg prompt throughput: {prompt_tps:.1f} tokens/s, Avg generation throughput: {gen_tps:.1f} tokens/s, "
            f"Running: {stats.num_running} reqs, Waiting: {stats.num_waiting} reqs, "
            f"KV cache usage: {100.0 * stats.kv_cache_usage:.1f}%, Prefix cache hit rate: {hit_rate:.1f}%"
        )

    def log(self, stats: EngineCoreStats) -> bool:
        """Log the line unless the engine has been idle since the last one; True if logged."""
        last = self._last_stats
        idle = (
            last is not None
            and stats.num_running == 0
            and stats.num_waiting == 0
            and stats.prompt_tokens == last.prompt_tokens
            and stats.generation_tokens == last.generation_tokens
        )
        if idle:
            self._last_time = time.monotonic()
            return False
        logger.info(self.format_line(stats))
        return True


def kv_capacity_line(num_blocks: int, block_size: int, max_model_len: int) -> str:
    """How much the KV cache holds, in tokens and in concurrent max-length requests."""
    tokens = num_blocks * block_size
    concurrency = tokens / max_model_len if max_model_len > 0 else 0.0
    return (
        f"KV cache: {num_blocks} blocks x {block_size} tokens = {tokens} tokens; "
        f"maximum concurrency for {max_model_len}-token requests: {concurrency:.2f}x"
    )
