"""pagedllm on Ray Serve: a local Ray cluster, two replicas behind the KV-aware request router, the openai client."""

from __future__ import annotations

import random
import socket
import time

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytestmark = pytest.mark.slow  # starts a Ray cluster and two engines: minutes on a busy machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory):
    from pagedllm.entrypoints.ray_serve import build_app
    from pagedllm.model.testing import make_tiny_model

    model = str(make_tiny_model("llama", tmp_path_factory.mktemp("ray-model"), seed=0, max_position_embeddings=1024))
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {
        "OMP_NUM_THREADS": "1", "PAGEDLLM_CPU_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(model, served_model_name="tiny", min_replicas=2, max_replicas=2, dtype="float32",
                        num_gpu_blocks_override=128)
        serve.run(app, name="pagedllm", route_prefix="/", blocking=False)
        import httpx

        deadline = time.monotonic() + 600
        while True:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code
                if status == 200:
                    break
                last = f"HTTP {status}"
            except httpx.HTTPError as exc:  # not listening yet
                last = repr(exc)
            assert time.monotonic() < deadline, f"the Serve app did not become healthy (last: {last})"
            time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_openai_client_completions_chat_and_streaming_through_ray_serve(ray_app):
    import openai

    client = openai.OpenAI(base_url=f"{ray_app}/v1", api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="hello ray", max_tokens=5, temperature=0.0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 5
    chunks = list(client.completions.create(model="tiny", prompt="hello ray", max_tokens=5, temperature=0.0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)


def test_requests_sharing_a_prefix_hit_the_cache_of_one_replica(ray_app):
    import httpx

    rng = random.Random(0)
    homes = set()
    for _ in range(3):
        prefix = [rng.randrange(3, 250) for _ in range(64)]
        served = []
        for i in range(4):
            r = httpx.post(f"{ray_app}/v1/completions", timeout=120, json={
                "model": "tiny", "prompt": prefix + [10 + i], "max_tokens": 2, "temperature": 0.0})
            assert r.status_code == 200, r.text
            served.append(r.headers["x-pagedllm-replica"])
            time.sleep(1.5)  # the replica's KV events and routing stats reach the router
        assert len(set(served)) == 1, served  # every repeat went where the prefix was cached
        homes.add(served[0])
