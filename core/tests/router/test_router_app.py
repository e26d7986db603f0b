"""`pagedllm router` in front of real `pagedllm serve` replicas: KV-aware placement, passthrough, failures."""

from __future__ import annotations

import random
import threading
import time

import httpx
import openai
import pytest
from router_procs import Replica, Router

# Each replica and router is a subprocess that loads a model: ~20-60 s per module on a busy machine.
pytestmark = pytest.mark.slow

REPLICA_ARGS = ["--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "1024", "--num-gpu-blocks-override", "256"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from pagedllm.model.testing import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("router-model"), seed=0, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def cluster(model):
    replicas = [Replica(model, REPLICA_ARGS) for _ in range(2)]
    router = None
    try:
        router = Router([r.spec for r in replicas], model=model)
        yield router, replicas
    finally:
        if router is not None:
            router.stop()
        for r in replicas:
            r.stop()


def _complete(url: str, prompt: list[int], max_tokens: int = 4) -> httpx.Response:
    r = httpx.post(f"{url}/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0})
    assert r.status_code == 200, r.text
    return r


def test_requests_sharing_a_prefix_land_on_the_replica_that_caches_it(cluster):
    router, replicas = cluster
    rng = random.Random(0)
    homes = []
    for _ in range(4):
        prefix = [rng.randrange(3, 250) for _ in range(96)]
        first = _complete(router.url, prefix + [rng.randrange(3, 250)]).headers["x-pagedllm-replica"]
        homes.append(first)
        for _ in range(3):
            time.sleep(0.3)  # the finished request's KV events reach the router
            suffix = [rng.randrange(3, 250) for _ in range(rng.randrange(1, 20))]
            assert _complete(router.url, prefix + suffix).headers["x-pagedllm-replica"] == first
    assert set(homes) == {r.url for r in replicas}  # fresh prefixes still spread over both
    status = router.status()["replicas"]
    assert all(s["kv_events"]["synced"] and s["kv_events"]["cached_blocks"] > 0 for s in status)


def test_streaming_is_passed_through_unchanged(cluster):
    router, replicas = cluster
    kw = dict(model="tiny", prompt="hello router", max_tokens=12, temperature=0.0, stream=True,
              extra_body={"ignore_eos": True})

    def chunks(client) -> list[str]:
        return [c.choices[0].text for c in client.completions.create(**kw) if c.choices]

    direct = chunks(openai.OpenAI(base_url=f"{replicas[0].url}/v1", api_key="none", max_retries=0))
    routed = chunks(router.openai())
    assert routed == direct and routed


def test_invalid_requests_get_the_replicas_openai_error(cluster):
    router, _ = cluster
    r = httpx.post(f"{router.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": -1})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{router.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_killed_replica_fails_in_flight_cleanly_retries_new_requests_and_comes_back(model):
    a, b = Replica(model, REPLICA_ARGS), Replica(model, REPLICA_ARGS)
    health_s = 1.0
    fast = slow = None
    try:
        fast = Router([a.spec, b.spec], model=model, health_interval=health_s)
        # A router that will not notice the death by health check for a minute: only retries can save it.
        slow = Router([a.spec, b.spec], model=model, health_interval=60.0)
        results: dict[int, str] = {}
        started = threading.Barrier(5)
        killed = threading.Event()

        def long_stream(i: int) -> None:
            try:
                stream = fast.openai(timeout=120).completions.create(
                    model="tiny", prompt=[5 + i] * 8, max_tokens=900, temperature=0.0, stream=True,
                    extra_body={"ignore_eos": True})
                first = True
                for _ in stream:
                    if first:
                        first = False
                        started.wait(60)
                    if killed.is_set():  # tokens still arrive after the kill: this stream is on the live replica
                        results[i] = "alive"
                        stream.close()
                        return
                results[i] = "completed"
            except openai.APIError as exc:
                results[i] = f"failed: {exc}"

        threads = [threading.Thread(target=long_stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        started.wait(60)
        a.kill()
        killed_at = time.monotonic()
        time.sleep(0.5)
        killed.set()
        # New requests right away: the slow router's first choice is often the dead replica.
        for i in range(4):
            r = _complete(slow.url, [7, 8, 9, i])
            assert r.headers["x-pagedllm-replica"] == b.url
        assert next(s for s in slow.status()["replicas"] if s["url"] == a.url)["healthy"] is False
        retries = httpx.get(f"{slow.url}/metrics").text
        assert 'pagedllm_router:retries_total{replica="' + b.url + '"}' in retries
        # Within one health interval (plus a check's timeout) the fast router has taken it out.
        while next(s for s in fast.status()["replicas"] if s["url"] == a.url)["healthy"]:
            assert time.monotonic() - killed_at < 2 * health_s + 1.0
            time.sleep(0.05)
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a stream hung after its replica died"
        outcomes = sorted(results.values())
        assert len(outcomes) == 4
        failed = [o for o in outcomes if o.startswith("failed")]
        assert failed and all("failed mid-stream" in o for o in failed), outcomes
        assert len(failed) < 4, outcomes  # the live replica's streams went on
        # The replica comes back where it was: the router puts it back and its KV view resyncs.
        a2 = Replica(model, REPLICA_ARGS, port=a.port, events=(a.events_port, a.snapshot_port))
        try:
            deadline = time.monotonic() + 30
            while not next(s for s in fast.status()["replicas"] if s["url"] == a.url)["healthy"]:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            served = {_complete(fast.url, [11, 12, i]).headers["x-pagedllm-replica"] for i in range(4)}
            assert a.url in served
        finally:
            a2.stop()
    finally:
        for r in (fast, slow):
            if r is not None:
                r.stop()
        a.stop()
        b.stop()
