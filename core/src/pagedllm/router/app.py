"""The standalone router: an OpenAI-compatible FastAPI app that forwards each request to one replica.

The policy (``router/policy.py``) picks among the healthy replicas. A request that never reached an
engine (connection refused, or the replica answered 503/429 at admission) is retried on the next
choice; one that failed after reaching a replica ends with an OpenAI-shaped error (a final SSE
``error`` event when streaming). Response bytes are passed through unchanged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

import pagedllm
from pagedllm.errors import InvalidRequestError, PagedLLMError, ServiceUnavailableError, UpstreamError
from pagedllm.router.policy import RoutingPolicy
from pagedllm.router.prompt_tokens import PromptTokenizer
from pagedllm.router.replica_pool import Replica, ReplicaPool

logger = logging.getLogger("pagedllm.router.app")

# Answers meaning "not admitted": the request never reached that replica's engine, so another may take it.
_NOT_ADMITTED = (429, 503)
_FORWARDED_HEADERS = ("authorization", "content-type", "accept")
REPLICA_HEADER = "x-pagedllm-replica"  # which replica served the response


@dataclass(slots=True)
class RouterSettings:
    max_attempts: int = 3  # replicas tried per request (first choice + retries)
    connect_timeout_s: float = 2.0
    request_timeout_s: float | None = None  # None: generation may take as long as it takes


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.routed = Counter("pagedllm_router:requests_routed", "Requests sent to a replica.", ["replica"], registry=r)
        self.retries = Counter("pagedllm_router:retries", "Requests retried on another replica.", ["replica"],
                               registry=r)
        self.failed = Counter("pagedllm_router:upstream_failures", "Requests a replica failed after admission.",
                              ["replica"], registry=r)
        self.cached_tokens = Counter("pagedllm_router:routed_cached_prompt_tokens",
                                     "Prompt tokens cached on the chosen replica (as its KV events say).",
                                     ["replica"], registry=r)
        self.healthy = Gauge("pagedllm_router:replica_healthy", "1 while the replica passes health checks.",
                             ["replica"], registry=r)
        self.in_flight = Gauge("pagedllm_router:replica_in_flight", "Requests in flight to the replica.",
                               ["replica"], registry=r)


def _error(exc: PagedLLMError) -> JSONResponse:
    return JSONResponse(exc.to_openai(), status_code=exc.http_status)


def _sse_error(exc: PagedLLMError) -> bytes:
    return f"data: {json.dumps(exc.to_openai())}\n\ndata: [DONE]\n\n".encode()


def build_router_app(pool: ReplicaPool, policy: RoutingPolicy, tokenizer: PromptTokenizer | None = None,
                     settings: RouterSettings | None = None) -> FastAPI:
    settings = settings or RouterSettings()
    metrics = RouterMetrics()
    timeout = httpx.Timeout(settings.request_timeout_s, connect=settings.connect_timeout_s)
    # No keep-alive: a refused connection then always means "never reached", which makes retries safe.
    client = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_keepalive_connections=0))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await pool.start()
        try:
            yield
        finally:
            await pool.close()
            await client.aclose()

    app = FastAPI(title="pagedllm router", version=pagedllm.__version__, lifespan=lifespan)
    app.state.pool = pool
    app.state.policy = policy

    def choose(token_ids: list[int] | None, salt: str | None, tried: set[int]) -> Replica | None:
        healthy = pool.healthy(tried)
        if not healthy:
            return None
        candidates = [r.candidate(token_ids, salt) for r in healthy]
        index = policy.choose(candidates, len(token_ids or ()))
        chosen = pool.replicas[index]
        cached = next(c.cached_tokens for c in candidates if c.index == index)
        metrics.cached_tokens.labels(chosen.url).inc(cached)
        return chosen

    async def forward(path: str, raw: Request) -> Response:
        data = await raw.body()
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(InvalidRequestError(f"request body is not valid JSON: {exc}"))
        if not isinstance(body, dict):
            return _error(InvalidRequestError("request body must be a JSON object"))
        token_ids = None
        if policy.uses_prefix and tokenizer is not None:
            token_ids = tokenizer.prompt_ids(path, body)
        salt = body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else None
        headers = {k: v for k, v in raw.headers.items() if k.lower() in _FORWARDED_HEADERS}
        tried: set[int] = set()
        last: Response | None = None
        for attempt in range(settings.max_attempts):
            replica = choose(token_ids, salt, tried)
            if replica is None:
                break
            tried.add(replica.index)
            if attempt:
                metrics.retries.labels(replica.url).inc()
            replica.in_flight += 1
            metrics.in_flight.labels(replica.url).set(replica.in_flight)
            try:
                resp = await client.send(client.build_request("POST", replica.url + path, content=data,
                                                              headers=headers), stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                _done(replica)
                pool.mark_down(replica, f"{type(exc).__name__}: {exc}")
                continue
            except httpx.HTTPError as exc:  # sent, then lost: the engine may have started it, so no retry
                _done(replica)
                metrics.failed.labels(replica.url).inc()
                return _error(UpstreamError(f"replica {replica.url} failed: {type(exc).__name__}: {exc}"))
            if resp.status_code in _NOT_ADMITTED:
                last = Response(await resp.aread(), status_code=resp.status_code,
                                media_type=resp.headers.get("content-type"),
                                headers={k: v for k, v in resp.headers.items() if k.lower() == "retry-after"})
                await resp.aclose()
                _done(replica)
                continue
            replica.routed += 1
            metrics.routed.labels(replica.url).inc()
            return await _respond(replica, resp, bool(body.get("stream")))
        if last is not None:
            return last
        return _error(ServiceUnavailableError("no healthy replica can take the request"))

    def _done(replica: Replica) -> None:
        replica.in_flight -= 1
        metrics.in_flight.labels(replica.url).set(replica.in_flight)

    async def _respond(replica: Replica, resp: httpx.Response, stream: bool) -> Response:
        media_type = resp.headers.get("content-type")
        if not stream or resp.status_code != 200:
            try:
                content = await resp.aread()
            except httpx.HTTPError as exc:
                metrics.failed.labels(replica.url).inc()
                return _error(UpstreamError(f"replica {replica.url} failed mid-response: {type(exc).__name__}"))
            finally:
                await resp.aclose()
                _done(replica)
            return Response(content, status_code=resp.status_code, media_type=media_type,
                            headers={REPLICA_HEADER: replica.url})

        async def passthrough() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            except httpx.HTTPError as exc:
                metrics.failed.labels(replica.url).inc()
                logger.warning("stream from %s broke: %s", replica.url, exc)
                yield _sse_error(UpstreamError(f"replica {replica.url} failed mid-stream: {type(exc).__name__}"))
            finally:
                await resp.aclose()
                _done(replica)

        return StreamingResponse(passthrough(), status_code=200, media_type=media_type,
                                 headers={REPLICA_HEADER: replica.url})

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Response:
        return await forward("/v1/completions", raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        return await forward("/v1/chat/completions", raw)

    async def _get_any(path: str, raw: Request) -> Response:
        headers = {k: v for k, v in raw.headers.items() if k.lower() in _FORWARDED_HEADERS}
        for replica in pool.healthy():
            try:
                r = await client.get(replica.url + path, headers=headers)
            except httpx.HTTPError as exc:
                pool.mark_down(replica, f"{type(exc).__name__}: {exc}")
                continue
            return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))
        return _error(ServiceUnavailableError("no healthy replica"))

    @app.get("/v1/models")
    async def models(raw: Request) -> Response:
        return await _get_any("/v1/models", raw)

    @app.post("/tokenize")
    async def tokenize(raw: Request) -> Response:
        return await forward("/tokenize", raw)

    @app.post("/detokenize")
    async def detokenize(raw: Request) -> Response:
        return await forward("/detokenize", raw)

    @app.get("/health")
    async def health() -> Response:
        if pool.healthy():
            return Response(status_code=200)
        return _error(ServiceUnavailableError("no healthy replica"))

    @app.get("/router/status")
    async def status() -> dict:
        return {"policy": policy.name, "replicas": pool.status()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        for r in pool.replicas:
            metrics.healthy.labels(r.url).set(1 if r.healthy else 0)
            metrics.in_flight.labels(r.url).set(r.in_flight)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
