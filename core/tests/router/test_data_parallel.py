"""`pagedllm serve --data-parallel-size 2`: two engine cores behind one server, prefix-affine, per-rank metrics."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from openai_server import children_of, free_port, pid_alive

pytestmark = pytest.mark.slow  # a server with two engine processes: ~30-60 s on a busy machine


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory):
    from pagedllm.model.testing import make_tiny_model

    model = make_tiny_model("llama", tmp_path_factory.mktemp("dp-model"), seed=0, max_position_embeddings=1024)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", str(model), "--port", str(port),
           "--served-model-name", "tiny", "--dtype", "float32", "--num-gpu-blocks-override", "128",
           "--data-parallel-size", "2", "--uvicorn-log-level", "warning"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server not healthy in time"
        time.sleep(0.5)
    engines = children_of(proc.pid)
    try:
        yield url, proc, engines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in engines:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def _per_rank(text: str, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(rf'{re.escape(name)}\{{.*data_parallel_rank="(\d+)".*\}} (\S+)', line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def test_two_engine_processes_serve_with_prefix_affinity_and_per_rank_metrics(dp_server):
    url, _, engines = dp_server
    assert len(engines) == 2
    rng = random.Random(0)
    prefixes = [[rng.randrange(3, 250) for _ in range(64)] for _ in range(4)]
    for _ in range(3):
        for p in prefixes:
            r = httpx.post(f"{url}/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": p + [rng.randrange(3, 250)], "max_tokens": 2, "temperature": 0.0})
            assert r.status_code == 200, r.text
            time.sleep(0.2)
    text = httpx.get(f"{url}/metrics", timeout=30).text
    hits = _per_rank(text, "pagedllm:prefix_cache_hits_total")
    queries = _per_rank(text, "pagedllm:prefix_cache_queries_total")
    assert set(queries) == {"0", "1"} and all(v > 0 for v in queries.values())  # both cores took prefixes
    # Every repeat found its 64-token prefix (4 blocks of 16) on the core that computed it first.
    assert sum(hits.values()) == 4 * 2 * 64


def test_health_reflects_every_engine_core(dp_server):
    url, proc, engines = dp_server
    os.kill(engines[1], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        try:
            status = httpx.get(f"{url}/health", timeout=2).status_code
        except httpx.HTTPError:
            status = None  # the server stopped: it exits when an engine core dies
        if status != 200:
            break
        assert time.monotonic() < deadline, "/health still 200 after an engine core died"
        time.sleep(0.1)
    assert proc.wait(60) == 1
