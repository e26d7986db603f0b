"""`pagedllm serve --tensor-parallel-size 2` answers the official openai client with TP 1's tokens; killing
a worker mid-stream fails every in-flight request within seconds, /health turns 503, the server exits
non-zero and leaves no process behind."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest
from openai_server import RemoteServer, children_of, pid_alive, tiny_model_dir
from pagedllm.entrypoints.llm import LLM
from pagedllm.sample.sampling_params import SamplingParams

pytestmark = pytest.mark.slow  # a TP 2 server start is three processes loading a model (~30 s here)

PROMPTS = ["The quick brown fox", "Paged attention keeps", "1, 2, 3,"]


def test_tp2_server_matches_tp1_then_a_killed_worker_fails_everything_and_exits_nonzero(tmp_path) -> None:
    model = tiny_model_dir(str(tmp_path))
    llm = LLM(model, dtype="float32")
    expected = [
        o.outputs[0].text
        for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    ]
    server = RemoteServer(model, ["--dtype", "float32", "--tensor-parallel-size", "2"])
    try:
        workers = children_of(server.engine_pid)
        assert len(workers) == 2, f"expected two worker processes under the engine, found {workers}"
        client = server.openai(timeout=60)
        got = [
            client.completions.create(
                model=model, prompt=p, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
            ).choices[0].text
            for p in PROMPTS
        ]
        assert got == expected

        errors: list[BaseException] = []
        started = [threading.Event() for _ in range(3)]
        finished_normally: list[int] = []

        def stream(i: int) -> None:
            try:
                for _ in client.completions.create(
                    model=model, prompt="a long one", max_tokens=240, stream=True, extra_body={"ignore_eos": True}
                ):
                    started[i].set()
                finished_normally.append(i)
            except BaseException as exc:  # the failure under test
                errors.append(exc)
            finally:
                started[i].set()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for e in started:
            assert e.wait(60)
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.monotonic()
        health: list[int] = []
        while server.proc.poll() is None and time.monotonic() - t0 < 30:
            try:
                health.append(httpx.get(f"{server.url}/health", timeout=1).status_code)
            except httpx.HTTPError:
                pass  # the server has stopped listening: it is exiting
            time.sleep(0.01)
        for t in threads:
            t.join(30)
        elapsed = time.monotonic() - t0
        assert finished_normally == [] and len(errors) == 3, (finished_normally, errors)
        assert all(not isinstance(e, openai.APIStatusError) or e.status_code >= 500 for e in errors), errors
        assert 503 in health and 200 not in health[health.index(503) :], health
        assert server.proc.wait(30) != 0
        assert elapsed < 30
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in [server.engine_pid, *workers]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(pid_alive(p) for p in [server.engine_pid, *workers])
    finally:
        server.stop()
        for pid in children_of(server.engine_pid):
            os.kill(pid, signal.SIGKILL)
