"""Soak: many requests against one real `pagedllm serve` (a tiny random Llama), mixing prompt lengths,
shared prefixes (prefix-cache reuse), streaming and not, chat, n > 1 and client cancellations. No
request is lost (each completes, or was cancelled by its client), the KV cache returns to empty, the
metrics counters add up, and resident memory after warm-up stays flat (< 5% growth).
The default suite runs 300 requests; `-m slow` runs 10,000."""

from __future__ import annotations

import asyncio
import random
import re
import time

import httpx
import pytest
from openai_server import RemoteServer, tiny_model_dir

# Up to ~190 tokens with the chat template (the tiny tokenizer is byte-level): the context is 256.
PREFIXES = ["You are a helpful assistant. Answer briefly and precisely. " * 2,
            "Context: the quick brown fox jumps over the lazy dog; " * 2,
            "Q: "]
CONCURRENCY = 16


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def _metrics(srv: RemoteServer) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{srv.url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _finished_total(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("pagedllm:request_success_total{"))


async def _one(c: httpx.AsyncClient, rng: random.Random, i: int) -> str:
    """One request of a random kind; returns its outcome: "done" or "cancelled" (anything else fails)."""
    prompt = rng.choice(PREFIXES) + " ".join(str(rng.randrange(1000)) for _ in range(rng.randrange(1, 15)))
    common = {"max_tokens": rng.randrange(1, 24), "temperature": 0.8, "seed": i, "ignore_eos": rng.random() < 0.5}
    kind = rng.choices(["plain", "stream", "chat", "n2", "cancel"], weights=[45, 20, 15, 10, 10])[0]
    if kind in ("plain", "n2"):
        r = await c.post("/v1/completions", json={"prompt": prompt, "n": 2 if kind == "n2" else 1, **common})
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert len(choices) == (2 if kind == "n2" else 1)
        assert all(ch["finish_reason"] in ("stop", "length") for ch in choices), choices
        return "done"
    if kind == "chat":
        r = await c.post("/v1/chat/completions",
                         json={"messages": [{"role": "user", "content": prompt}], **common})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text
        return "done"
    body = {"prompt": prompt, "stream": True, **common}
    if kind == "cancel":
        body.update(max_tokens=60, ignore_eos=True)  # still running when the client hangs up
    async with c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = []
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                lines.append(line)
                if kind == "cancel":
                    return "cancelled"  # leaving the block closes the connection: the server aborts
    assert lines[-1] == "data: [DONE]" and '"finish_reason":' in lines[-2], lines[-2:]
    return "done"


async def _run(srv: RemoteServer, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    sem = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=srv.url, timeout=300,
                                 limits=httpx.Limits(max_connections=CONCURRENCY)) as c:

        async def guarded(i: int) -> str:
            async with sem:
                return await _one(c, random.Random(rng.random()), seed * 1_000_000 + i)

        return list(await asyncio.gather(*(guarded(i) for i in range(n))))


def _wait_idle(srv: RemoteServer, finished: float) -> dict[str, float]:
    """Metrics once every request is counted and the engine holds no block (aborts settle asynchronously)."""
    deadline = time.monotonic() + 30
    while True:
        m = _metrics(srv)
        usage = next(v for k, v in m.items() if k.startswith("pagedllm:kv_cache_usage_perc"))
        running = next(v for k, v in m.items() if k.startswith("pagedllm:num_requests_running"))
        if (usage == 0.0 and running == 0 and _finished_total(m) >= finished) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def _soak(tmp_path_factory, n: int) -> None:
    model = tiny_model_dir(str(tmp_path_factory.mktemp("model")))
    srv = RemoteServer(model, ["--dtype", "float32", "--num-gpu-blocks-override", "256", "--max-num-seqs", "16",
                               "--disable-uvicorn-access-log"])
    try:
        pids = [srv.proc.pid, srv.engine_pid]
        warmup = max(50, n // 10)
        outcomes = asyncio.run(_run(srv, warmup, seed=1))
        before = _wait_idle(srv, warmup)
        rss_before = sum(_rss_kib(p) for p in pids)
        outcomes += asyncio.run(_run(srv, n - warmup, seed=2))
        after = _wait_idle(srv, n)
        rss_after = sum(_rss_kib(p) for p in pids)
    finally:
        assert srv.stop() == 0

    # No request lost: each one completed or was cancelled by its own client, and the server counted each once.
    assert len(outcomes) == n and set(outcomes) <= {"done", "cancelled"}
    assert _finished_total(after) == n, {k: v for k, v in after.items() if "request_success" in k}
    aborted = next(v for k, v in after.items() if re.match(r'pagedllm:request_success_total\{.*"abort"', k))
    assert aborted == outcomes.count("cancelled")
    e2e = next(v for k, v in after.items() if k.startswith("pagedllm:e2e_request_latency_seconds_count"))
    assert e2e == n
    # Every KV block is free again (prefix-cached blocks are free: evictable), nothing runs or waits.
    assert next(v for k, v in after.items() if k.startswith("pagedllm:kv_cache_usage_perc")) == 0.0
    assert next(v for k, v in after.items() if k.startswith("pagedllm:num_requests_waiting")) == 0.0
    hits = next(v for k, v in after.items() if k.startswith("pagedllm:prefix_cache_hits_total"))
    assert hits > next(v for k, v in before.items() if k.startswith("pagedllm:prefix_cache_hits_total")) > 0
    growth = (rss_after - rss_before) / rss_before
    assert growth < 0.05, f"resident memory grew {growth:.1%} ({rss_before} -> {rss_after} KiB) after warm-up"


def test_soak_300_mixed_requests_loses_nothing_and_returns_every_block(tmp_path_factory):
    _soak(tmp_path_factory, 300)


@pytest.mark.slow
def test_soak_10000_mixed_requests_loses_nothing_and_returns_every_block(tmp_path_factory):
    _soak(tmp_path_factory, 10_000)
