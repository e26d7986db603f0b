"""Prometheus metrics follow the engine's cumulative stats; the log line reports rates."""

from pagedllm.engine.types import EngineCoreStats
from pagedllm.metrics import ServerMetrics, StatLogger, kv_capacity_line
from prometheus_client import generate_latest


def _value(m: ServerMetrics, name: str, **labels) -> float:
    return m.registry.get_sample_value(name, {"model_name": "m", **labels})


def test_counters_advance_by_deltas_and_gauges_follow_latest():
    m = ServerMetrics("m")
    m.observe_engine_stats(EngineCoreStats(num_running=2, kv_cache_usage=0.5, prompt_tokens=10,
                                           generation_tokens=3, prefix_cache_queries=10, prefix_cache_hits=4))
    m.observe_engine_stats(EngineCoreStats(num_running=0, kv_cache_usage=0.0, prompt_tokens=12,
                                           generation_tokens=7, prefix_cache_queries=12, prefix_cache_hits=4))
    assert _value(m, "pagedllm:prompt_tokens_total") == 12
    assert _value(m, "pagedllm:generation_tokens_total") == 7
    assert _value(m, "pagedllm:prefix_cache_hits_total") == 4
    assert _value(m, "pagedllm:num_requests_running") == 0
    assert _value(m, "pagedllm:kv_cache_usage_perc") == 0.0


def test_request_histograms_and_success_by_reason():
    m = ServerMetrics("m")
    m.observe_first_token(0.2, 0.05)
    m.observe_inter_token(0.3, 3)
    m.observe_finished("length", 1.0)
    assert _value(m, "pagedllm:time_to_first_token_seconds_count") == 1
    assert _value(m, "pagedllm:request_queue_time_seconds_count") == 1
    assert _value(m, "pagedllm:inter_token_latency_seconds_count") == 3
    assert _value(m, "pagedllm:request_success_total", finished_reason="length") == 1
    assert _value(m, "pagedllm:request_success_total", finished_reason="stop") == 0
    assert b"pagedllm:e2e_request_latency_seconds_bucket" in generate_latest(m.registry)


def test_two_servers_do_not_share_a_registry():
    a, b = ServerMetrics("m"), ServerMetrics("m")
    a.observe_finished("stop", 0.1)
    assert _value(b, "pagedllm:request_success_total", finished_reason="stop") == 0


def test_log_line_reports_throughput_since_last_line():
    log = StatLogger(10)
    log.format_line(EngineCoreStats(), now=0.0)
    line = log.format_line(EngineCoreStats(prompt_tokens=100, generation_tokens=50, num_running=3,
                                           kv_cache_usage=0.25, prefix_cache_queries=10, prefix_cache_hits=5),
                           now=10.0)
    assert "prompt throughput: 10.0" in line and "generation throughput: 5.0" in line
    assert "Running: 3" in line and "KV cache usage: 25.0%" in line and "hit rate: 50.0%" in line


def test_kv_capacity_line_counts_tokens_and_max_length_requests():
    line = kv_capacity_line(num_blocks=100, block_size=16, max_model_len=800)
    assert "1600 tokens" in line and "2.00x" in line


def test_log_line_is_skipped_while_the_engine_stays_idle():
    log = StatLogger(10)
    busy = EngineCoreStats(generation_tokens=5, num_running=1)
    assert log.log(busy) is True
    done = EngineCoreStats(generation_tokens=9)
    assert log.log(done) is True  # the tokens since the last line are still reported
    assert log.log(done) is False
