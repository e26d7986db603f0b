"""When the engine process dies, waiting requests fail fast with 503, /health says 503, and the
server stops with a non-zero exit code (on the way: a --chat-template override replaces the
model's template). The engine here is a stand-in that crashes on demand; it starts in seconds."""

import asyncio
import json
import time

import httpx
from openai_fake_core import CRASH_TOKEN
from openai_server import free_port
from pagedllm.config import EngineConfig
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.openai.api_server import build_app, serve_engine
from pagedllm.entrypoints.openai.serving_common import ServerSettings

TEMPLATE = "{% for m in messages %}[{{ m.role }}]{{ m.content }}[/{{ m.role }}]{% endfor %}" \
           "{% if add_generation_prompt %}<bot>{% endif %}"


def test_template_override_applies_and_engine_death_fails_requests_and_exits_1():
    async def main():
        engine = await AsyncLLM.from_config(EngineConfig(), core_factory="openai_fake_core:FakeEngineCore",
                                            log_interval_s=0, startup_timeout_s=120)
        settings = ServerSettings(served_model_names=["fake"], chat_template=TEMPLATE)
        port = free_port()
        server = asyncio.create_task(serve_engine(engine, settings, "127.0.0.1", port, log_level="warning"))
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            for _ in range(200):
                try:
                    if (await c.get("/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    await asyncio.sleep(0.05)
            ok = await c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 3})
            rendered = await c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
            rendered = (await c.post("/detokenize", json={"tokens": rendered.json()["tokens"]})).json()["prompt"]
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
            waiting = asyncio.create_task(c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 120}))

            async def stream_lines() -> list[str]:
                body = {"prompt": [3, 4], "max_tokens": 120, "stream": True}
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    return [line async for line in r.aiter_lines() if line.startswith("data: ")]

            streaming = asyncio.create_task(stream_lines())
            await asyncio.sleep(0.3)  # both long requests are running in the engine
            t0 = time.monotonic()
            crash = await c.post("/v1/completions", json={"prompt": [CRASH_TOKEN, 1], "max_tokens": 5})
            long = await waiting
            streamed = await streaming
            elapsed = time.monotonic() - t0
        code = await asyncio.wait_for(server, 30)
        health = await httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(engine, settings)),
                                         base_url="http://t").get("/health")
        return ok, rendered, long, streamed, crash, elapsed, code, health

    ok, rendered, long, streamed, crash, elapsed, code, health = asyncio.run(main())
    assert rendered == "[user]hi[/user]<bot>"  # --chat-template replaced the model's ChatML template
    assert long.status_code == 503 and crash.status_code == 503
    assert long.json()["error"]["type"] == "service_unavailable"
    assert elapsed < 3.0
    # a stream that had started ends with an error chunk in OpenAI shape, then [DONE]
    assert streamed[-1] == "data: [DONE]"
    assert json.loads(streamed[-2][6:])["error"]["type"] == "service_unavailable"
    assert health.status_code == 503
    assert code == 1
