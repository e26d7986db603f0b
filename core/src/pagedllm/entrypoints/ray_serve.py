"""pagedllm on Ray Serve (optional extra ``pagedllm[ray]``): replicas across a Ray cluster, KV-aware routing.

``build_app(...)`` returns a Serve application of two deployments:
- ``PagedLLMReplica``: one engine (AsyncLLM + its engine-core process) and pagedllm's own OpenAI app
  on a loopback port; it publishes KV events on a node-reachable port and reports them, with its load,
  as Ray Serve routing stats. Autoscaling follows Ray Serve's rule: replicas are added or removed to keep
  ``target_ongoing_requests`` (queue depth) per replica, between ``min_replicas`` and ``max_replicas``.
- ``OpenAIIngress``: the HTTP entry (/v1/completions, /v1/chat/completions, /v1/models, /health); it
  tokenizes the prompt and calls a replica through a handle whose request router is
  ``KVAwareRequestRouter`` (the same rule as ``pagedllm router``). Response bytes stream back unchanged.

    from ray import serve
    from pagedllm.entrypoints.ray_serve import build_app
    serve.run(build_app(model=None, min_replicas=1, max_replicas=4), route_prefix="/")
"""

# No `from __future__ import annotations` here: Ray Serve rewrites the ingress methods' signatures and
# FastAPI must then see real classes (a string "Request" annotation turns into a body parameter: 422).
import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from pagedllm.errors import InvalidRequestError, ServiceUnavailableError

logger = logging.getLogger("pagedllm.entrypoints.ray_serve")

_PATHS = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")


def _free_port(host: str = "") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PagedLLMReplica:
    """One engine behind pagedllm's OpenAI app on 127.0.0.1; ``handle`` streams its HTTP answers back."""

    def __init__(self, engine_kwargs: dict, served_model_name: str | None = None) -> None:
        self.engine_kwargs = dict(engine_kwargs)
        self.served_model_name = served_model_name
        self._started: asyncio.Task | None = None
        self.engine: Any = None
        self.port = 0
        self.node_ip = "127.0.0.1"
        self.events = self.snapshot = ""
        self._server: Any = None
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))

    async def _start(self) -> None:
        import ray
        import uvicorn

        from pagedllm.engine.async_llm import AsyncLLM
        from pagedllm.engine.engine_args import EngineArgs
        from pagedllm.entrypoints.openai.api_server import build_app as build_openai_app
        from pagedllm.entrypoints.openai.serving_common import ServerSettings
        from pagedllm.metrics import ServerMetrics

        self.node_ip = ray.util.get_node_ip_address()
        ev, snap = _free_port(), _free_port()
        kv = {"enable_kv_cache_events": True, "endpoint": f"tcp://*:{ev}", "snapshot_endpoint": f"tcp://*:{snap}"}
        config = EngineArgs.from_kwargs(**self.engine_kwargs, kv_events_config=kv).create_engine_config()
        self.engine = await AsyncLLM.from_config(config)
        name = self.served_model_name or self.engine.tokenizer_info.model_name
        self.engine.metrics = ServerMetrics(name)
        app = build_openai_app(self.engine, ServerSettings(served_model_names=[name]))
        self.port = _free_port("127.0.0.1")
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     lifespan="off"))
        asyncio.create_task(self._server.serve())
        while not self._server.started:
            await asyncio.sleep(0.05)
        self.events, self.snapshot = f"tcp://{self.node_ip}:{ev}", f"tcp://{self.node_ip}:{snap}"

    async def ready(self) -> None:
        if self._started is None:
            self._started = asyncio.create_task(self._start())
        await asyncio.shield(self._started)

    async def handle(self, path: str, body: bytes, headers: dict[str, str], prompt_token_ids: list[int] | None = None,
                     cache_salt: str | None = None) -> AsyncIterator[Any]:
        """Yields (status, content type, this replica's address) first, then the response bytes as they come.

        ``prompt_token_ids`` and ``cache_salt`` are for the request router, which reads them here.
        """
        await self.ready()
        if path not in _PATHS:
            raise ValueError(f"path {path!r} is not served")
        req = self._client.build_request("POST", f"http://127.0.0.1:{self.port}{path}", content=body, headers=headers)
        resp = await self._client.send(req, stream=True)
        try:
            yield resp.status_code, resp.headers.get("content-type", "application/json"), f"{self.node_ip}:{self.port}"
            async for chunk in resp.aiter_raw():
                yield chunk
        finally:
            await resp.aclose()

    async def models(self) -> bytes:
        await self.ready()
        return (await self._client.get(f"http://127.0.0.1:{self.port}/v1/models")).content

    async def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine died."""
        if self.engine is not None and self.engine.is_dead:
            raise RuntimeError("the engine core died")

    def record_routing_stats(self) -> dict[str, Any]:
        if self.engine is None:
            return {}
        s = self.engine.latest_stats
        return {"kv_events": self.events, "kv_snapshot": self.snapshot, "running": s.num_running,
                "waiting": s.num_waiting, "kv_cache_usage": s.kv_cache_usage, "in_flight": self.engine.num_in_flight}

    async def __del__(self) -> None:
        if self.engine is not None:
            await self.engine.shutdown()


ingress_app = FastAPI(title="pagedllm on Ray Serve")


@serve.ingress(ingress_app)
class OpenAIIngress:
    def __init__(self, replica: Any, model: str | None = None, chat_template: str | None = None) -> None:
        from pagedllm.router.prompt_tokens import PromptTokenizer

        self.replica = replica
        self.tokenizer = PromptTokenizer.for_model(model, chat_template)

    async def _forward(self, path: str, raw: Request) -> Response:
        data = await raw.body()
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            err = InvalidRequestError(f"request body is not valid JSON: {exc}")
            return JSONResponse(err.to_openai(), status_code=err.http_status)
        ids = self.tokenizer.prompt_ids(path, body) if isinstance(body, dict) else None
        salt = body.get("cache_salt") if isinstance(body, dict) and isinstance(body.get("cache_salt"), str) else None
        headers = {k: v for k, v in raw.headers.items() if k.lower() in ("authorization", "content-type")}
        gen = self.replica.options(stream=True).handle.remote(path, data, headers, prompt_token_ids=ids,
                                                                cache_salt=salt)
        status, media_type, where = await gen.__anext__()
        tag = {"x-pagedllm-replica": where}
        if status != 200 or not (isinstance(body, dict) and body.get("stream")):
            return Response(b"".join([chunk async for chunk in gen]), status_code=status, media_type=media_type,
                            headers=tag)

        async def passthrough() -> AsyncIterator[bytes]:
            async for chunk in gen:
                yield chunk

        return StreamingResponse(passthrough(), media_type=media_type, headers=tag)

    @ingress_app.post("/v1/completions")
    async def completions(self, raw: Request) -> Response:
        return await self._forward("/v1/completions", raw)

    @ingress_app.post("/v1/chat/completions")
    async def chat_completions(self, raw: Request) -> Response:
        return await self._forward("/v1/chat/completions", raw)

    @ingress_app.get("/v1/models")
    async def models(self) -> Response:
        return Response(await self.replica.models.remote(), media_type="application/json")

    @ingress_app.get("/health")
    async def health(self) -> Response:
        try:
            await self.replica.models.remote()
        except Exception as exc:  # no replica can answer: say so in the OpenAI shape
            err = ServiceUnavailableError(f"no healthy replica: {type(exc).__name__}")
            return JSONResponse(err.to_openai(), status_code=err.http_status)
        return Response(status_code=200)


def build_app(model: str | None = None, *, served_model_name: str | None = None, chat_template: str | None = None,
              min_replicas: int = 1, max_replicas: int = 2, initial_replicas: int | None = None,
              target_ongoing_requests: float = 4.0, max_ongoing_requests: int = 64, load_cost_tokens: float = 32.0,
              replica_cpus: float = 1.0, replica_gpus: float = 0.0, **engine_kwargs: Any):
    """The Serve application; ``engine_kwargs`` are EngineArgs fields (dtype, max_model_len, ...)."""
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig

    replica = serve.deployment(
        PagedLLMReplica,
        name="PagedLLMReplica",
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        max_ongoing_requests=max_ongoing_requests,
        autoscaling_config=AutoscalingConfig(
            min_replicas=min_replicas, max_replicas=max_replicas,
            initial_replicas=initial_replicas if initial_replicas is not None else min_replicas,
            target_ongoing_requests=target_ongoing_requests),
        request_router_config=RequestRouterConfig(
            request_router_class="pagedllm.router.ray_request_router:KVAwareRequestRouter",
            request_router_kwargs={"load_cost_tokens": load_cost_tokens},
            request_routing_stats_period_s=1.0),
    ).bind({"model": model, "chat_template": chat_template, **engine_kwargs}, served_model_name)
    ingress = serve.deployment(OpenAIIngress, name="OpenAIIngress", ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica, model, chat_template)
