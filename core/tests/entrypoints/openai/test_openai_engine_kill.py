"""A real `pagedllm serve` whose engine fails mid-stream: killed with SIGKILL, or a kernel raising inside
a step (through a test-only plugin). Every client gets an error promptly, /health never answers 200
again, the server exits non-zero with a log line saying why, and no engine process is left behind.

A kernel that raised mid-forward may have left the KV cache half-written, and blocks of the step's
requests may already be in the prefix cache: the engine cannot tell which state is sound, so it
fails as a whole, cleanly, rather than go on serving from possibly corrupt state."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from faulty_plugin import FAULT_ENV, build_faulty_site
from openai_server import RemoteServer, children_of, pid_alive, tiny_model_dir

ARGS = ["--dtype", "float32", "--num-gpu-blocks-override", "256", "--enforce-eager", "--max-num-seqs", "8"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return tiny_model_dir(str(tmp_path_factory.mktemp("model")))


async def _clients_until_failure(url: str, fail) -> tuple[list, list, float]:
    """Three streaming and three non-streaming long requests; once every stream has sent a chunk, call
    ``fail()``; returns (stream outcomes, JSON responses, seconds from the failure to the last error)."""
    body = {"prompt": "hello", "max_tokens": 240, "ignore_eos": True, "temperature": 0}
    started = [asyncio.Event() for _ in range(3)]
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:

        async def stream(i: int) -> list[str]:
            async with c.stream("POST", "/v1/completions", json={**body, "stream": True, "seed": i}) as r:
                lines = []
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        started[i].set()
                return lines

        streams = [asyncio.create_task(stream(i)) for i in range(3)]
        plain = [asyncio.create_task(c.post("/v1/completions", json={**body, "seed": 10 + i})) for i in range(3)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
        t0 = time.monotonic()
        fail()
        streamed = await asyncio.wait_for(asyncio.gather(*streams, return_exceptions=True), 60)
        answers = await asyncio.wait_for(asyncio.gather(*plain, return_exceptions=True), 60)
        return streamed, answers, time.monotonic() - t0


def _check_every_client_failed(streamed, answers, elapsed: float) -> None:
    for lines in streamed:
        # a stream that had started ends with an error chunk in OpenAI shape, then [DONE]
        assert not isinstance(lines, BaseException), lines
        assert lines[-1] == "data: [DONE]" and "error" in json.loads(lines[-2][6:]), lines[-3:]
        assert json.loads(lines[-2][6:])["error"]["type"] == "service_unavailable"
    for r in answers:
        assert not isinstance(r, BaseException), r
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", r.text
    assert elapsed < 30, f"clients waited {elapsed:.1f} s for their errors"


def _check_server_stopped(srv: RemoteServer, log: Path, why: str) -> None:
    server_pid = srv.proc.pid
    code = srv.proc.wait(60)
    assert code != 0
    text = log.read_text()
    assert "engine is dead" in text and why in text, text[-3000:]
    deadline = time.monotonic() + 10
    while pid_alive(srv.engine_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(srv.engine_pid), "engine process left behind"
    assert children_of(server_pid) == []


def _health_never_200(url: str, until: float) -> list:
    seen = []
    while time.monotonic() < until:
        try:
            seen.append(httpx.get(f"{url}/health", timeout=2).status_code)
        except httpx.HTTPError:
            seen.append("refused")
            break
        time.sleep(0.02)
    return seen


def test_sigkill_of_the_engine_fails_every_client_and_stops_the_server(model, tmp_path):
    log = tmp_path / "server.log"
    srv = RemoteServer(model, ARGS, log_path=str(log))
    try:
        streamed, answers, elapsed = asyncio.run(
            _clients_until_failure(srv.url, lambda: os.kill(srv.engine_pid, signal.SIGKILL)))
        health = _health_never_200(srv.url, time.monotonic() + 10)
        _check_every_client_failed(streamed, answers, elapsed)
        assert 200 not in health and health[-1] in (503, "refused"), health
        _check_server_stopped(srv, log, "exited with code -9")
    finally:
        srv.stop()


def test_a_kernel_raising_in_a_step_fails_the_engine_cleanly(model, tmp_path):
    site = build_faulty_site(tmp_path / "site")
    trigger = tmp_path / "fault-now"
    log = tmp_path / "server.log"
    pythonpath = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    srv = RemoteServer(model, [*ARGS, "--platform", "faulty"], log_path=str(log),
                       env={FAULT_ENV: str(trigger), "PYTHONPATH": pythonpath})
    try:
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "ok", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200  # the plugin serves normally until the fault is armed
        streamed, answers, elapsed = asyncio.run(_clients_until_failure(srv.url, trigger.touch))
        health = _health_never_200(srv.url, time.monotonic() + 10)
        _check_every_client_failed(streamed, answers, elapsed)
        assert 200 not in health, health
        _check_server_stopped(srv, log, "RuntimeError: injected kernel fault in silu_and_mul")
    finally:
        srv.stop()
