"""The EngineCore process: requests in, outputs out over ZMQ; aborts free work; startup failures\nare reported. (Engine death is tested through the whole server in test_openai_engine_death.py.)"""

import asyncio
import os
import subprocess
import sys
import time

import pytest
from pagedllm.config import EngineConfig
from pagedllm.engine.core_client import EngineCoreClient, EngineStartupError
from pagedllm.engine.types import EngineCoreRequest
from pagedllm.sample.sampling_params import SamplingParams

FACTORY = "openai_fake_core:FakeEngineCore"


def _req(rid, first=1, max_tokens=5):
    return EngineCoreRequest(request_id=rid, prompt_token_ids=[first, 2], arrival_time=time.time(),
                             sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0.0))


async def _collect_until(client, pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        kind, payload = await asyncio.wait_for(client.get_output(), timeout)
        seen.append((kind, payload))
        if pred(kind, payload):
            return seen
    raise AssertionError("condition not reached")


def test_requests_complete_aborts_free_work_and_shutdown_reaps_the_child():
    async def main():
        client = EngineCoreClient(EngineConfig(), core_factory=FACTORY)
        try:
            ready = await client.start(timeout_s=120)
            assert ready.num_blocks == 10 and ready.pid == client.pid
            client.add_request(_req("a", max_tokens=3))
            tokens = []

            def done(kind, payload):
                if kind == "outputs":
                    for o in payload.outputs:
                        tokens.extend(o.new_token_ids)
                        if o.finish_reason == "length":
                            return True
                return False

            await _collect_until(client, done)
            client.add_request(_req("long", max_tokens=10_000))
            await _collect_until(client, lambda k, p: k == "outputs" and p.stats.num_running == 1)
            client.abort_requests(["long"])
            seen = await _collect_until(client, lambda k, p: k == "stats" and p.kv_cache_usage == 0.0)
            idle_stats = seen[-1][1]
        finally:
            client.shutdown()
        return tokens, idle_stats, client.proc.returncode

    tokens, idle_stats, code = asyncio.run(main())
    assert tokens == [3, 4, 5]
    assert idle_stats.num_running == 0  # the abort freed it, and the idle core said so
    assert code == 0  # the child exited on the shutdown message, not by a signal


def test_startup_failure_is_reported_with_its_reason():
    async def main():
        client = EngineCoreClient(EngineConfig(), core_factory="openai_fake_core:NoSuchCore")
        await client.start(timeout_s=120)

    with pytest.raises(EngineStartupError, match="NoSuchCore"):
        asyncio.run(main())


_SEND_AFTER_DEATH = """
import asyncio, sys, time
sys.path.insert(0, sys.argv[1])
from pagedllm.config import EngineConfig
from pagedllm.engine.core_client import EngineCoreClient
from pagedllm.errors import EngineDeadError
from test_openai_core_client import FACTORY, _req

async def main():
    client = EngineCoreClient(EngineConfig(), core_factory=FACTORY)
    await client.start(timeout_s=120)
    client.proc.kill()
    client.proc.wait(timeout=30)
    for name, send in (("add", lambda: client.add_request(_req("after-death"))),
                       ("abort", lambda: client.abort_requests(["x"])), ("stats", client.request_stats)):
        try:
            send()
            print(name, "sent")
        except EngineDeadError as exc:
            print(name, "EngineDeadError", exc)
    client.shutdown()

asyncio.run(main())
"""


def test_sends_to_a_dead_engine_raise_instead_of_blocking_the_event_loop():
    # A PUSH socket with no connected peer blocks send() forever: a request (or an abort) arriving
    # between the engine's death and the output loop noticing it used to hang the whole server.
    # In a child process, so that a regression fails on the timeout instead of hanging the test run.
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", _SEND_AFTER_DEATH, here], capture_output=True, text=True, timeout=60)
    lines = r.stdout.splitlines()
    assert r.returncode == 0, r.stderr[-2000:]
    assert [line.split()[:2] for line in lines] == [["add", "EngineDeadError"], ["abort", "EngineDeadError"],
                                                   ["stats", "EngineDeadError"]], r.stdout
    assert all("exited with code -9" in line for line in lines), r.stdout
