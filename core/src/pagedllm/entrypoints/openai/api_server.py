"""The OpenAI-compatible FastAPI app (``build_app``) and the server process around it (``run_server``)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import time
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import pagedllm
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_common import ServerSettings
from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedllm.entrypoints.openai.tokenizer_info import tokenizer_info_response
from pagedllm.errors import (
    AuthenticationError,
    InvalidRequestError,
    PagedLLMError,
    QueueFullError,
    ServiceUnavailableError,
)
from pagedllm.metrics import ServerMetrics

logger = logging.getLogger("pagedllm.entrypoints.openai.api_server")

_HTTP_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                     405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                     503: "service_unavailable"}


def error_body(status: int, message: str, param: str | None = None, err_type: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type or _HTTP_ERROR_TYPES.get(status, "internal_error"),
                      "param": param, "code": None}}  # OpenAI's code is a string or null


async def _send_json(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
                + (headers or [])})
    await send({"type": "http.response.body", "body": raw})


class ApiKeyMiddleware:
    """Bearer-token check on every /v1 route (constant-time compare); /health and /metrics stay open."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                err = AuthenticationError("invalid or missing API key", code="invalid_api_key")
                await _send_json(send, 401, err.to_openai(), [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Reads a request body up to the limit (413 beyond it) and replays it to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        too_big = error_body(413, f"request body exceeds the limit of {self.max_bytes} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_json(send, 413, too_big, [(b"connection", b"close")])
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await _send_json(send, 413, too_big, [(b"connection", b"close")])
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the disconnect that cancellation watches for

        await self.app(scope, replay, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        if param is None and loc:
            param = loc[0]
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return "; ".join(parts[:5]) or "invalid request", param


def build_app(engine: AsyncLLM, settings: ServerSettings) -> FastAPI:
    """The app for one engine. Every error leaves in OpenAI's shape."""
    app = FastAPI(title="pagedllm OpenAI-compatible API", version=pagedllm.__version__)
    app.state.engine = engine
    app.state.settings = settings
    if engine.metrics is None:
        engine.metrics = ServerMetrics(settings.served_model_names[0])
    metrics = engine.metrics
    completion = OpenAIServingCompletion(engine, settings)
    chat = OpenAIServingChat(engine, settings)

    @app.exception_handler(PagedLLMError)
    async def _pagedllm_error(_: Request, exc: PagedLLMError) -> JSONResponse:
        headers = {"Retry-After": "1"} if isinstance(exc, QueueFullError) else None
        if exc.http_status >= 500 and not isinstance(exc, ServiceUnavailableError):
            logger.error("request failed: %s", exc)
        return JSONResponse(exc.to_openai(), status_code=exc.http_status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(InvalidRequestError(message, param=param).to_openai(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        # FastAPI reports an undecodable (e.g. invalid UTF-8) body as this generic 400.
        return JSONResponse(error_body(status, str(exc.detail)), status_code=status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        if engine.is_dead:
            return JSONResponse(error_body(503, "engine is dead"), status_code=503)
        if engine.draining:
            return JSONResponse(error_body(503, "server is shutting down"), status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": pagedllm.__version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        await engine.fresh_stats(timeout_s=0.5)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[
            ModelCard(id=name, root=settings.served_model_names[0], max_model_len=engine.max_model_len)
            for name in settings.served_model_names
        ])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def model(model_id: str) -> ModelCard:
        completion.check_model(model_id)
        return ModelCard(id=model_id, root=settings.served_model_names[0], max_model_len=engine.max_model_len)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: CompletionRequest, raw_request: Request) -> Response:
        return await completion.create(request, raw_request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await chat.create(request, raw_request)

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        completion.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages", param="prompt")
        if request.messages is not None:
            msgs = [{"role": m.role, "content": m.text()} for m in request.messages]
            tokens = chat.render_prompt(msgs, request.add_generation_prompt)
        else:
            tokens = list(engine.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens))
        return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens)

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        completion.check_model(request.model)
        vocab = int(getattr(engine.tokenizer_info, "vocab_size", 0) or len(engine.tokenizer))
        bad = [t for t in request.tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (size {vocab})", param="tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(request.tokens))

    if settings.enable_tokenizer_info_endpoint:  # off by default, as in vLLM

        @app.get("/tokenizer_info")
        async def tokenizer_info() -> dict:
            template = settings.chat_template or getattr(engine.tokenizer_info, "chat_template", None)
            return tokenizer_info_response(engine.tokenizer, template)

    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    return app


DEAD_ENGINE_LINGER_S = 1.0  # how long a server whose engine died still answers (503) before it exits


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM first drains: admission stops (503), in-flight requests get up to
    ``shutdown_timeout_s`` to finish, the rest are aborted, then the server stops."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLM, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout_s = shutdown_timeout_s
        self._drain_deadline: float | None = None
        self._abort_now = False
        self._drain_logged = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler: only set flags; on_tick does the work on the event loop.
        # Deliberately not uvicorn's handler, which re-raises the signal after serve() returns
        # and would kill us before the engine process is stopped.
        if sig == signal.SIGTERM and self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self.shutdown_timeout_s
            self.engine.draining = True  # admission stops now, not on the next tick (a plain flag)
        elif self._abort_now:
            self.force_exit = True
        else:
            self._abort_now = True

    async def on_tick(self, counter: int) -> bool:
        if self._abort_now or self._drain_deadline is not None:
            if not self._drain_logged:
                self._drain_logged = True
                self.engine.draining = True
                logger.info("shutting down: admission stopped, %d request(s) in flight", self.engine.num_in_flight)
            late = self._drain_deadline is not None and time.monotonic() > self._drain_deadline
            if self._abort_now or late or self.engine.num_in_flight == 0:
                if self.engine.num_in_flight:
                    logger.warning("aborting %d request(s) still in flight", self.engine.num_in_flight)
                    self.engine.abort_all()
                self.should_exit = True
        return await super().on_tick(counter)


async def serve_engine(engine: AsyncLLM, settings: ServerSettings, host: str, port: int,
                       shutdown_timeout_s: float = 30.0, log_level: str = "info", access_log: bool = True) -> int:
    """Serve ``engine`` until SIGTERM/SIGINT or engine death; returns the process exit code.
    Each request line goes to the ``uvicorn.access`` log unless ``access_log`` is off (as vLLM does)."""
    app = build_app(engine, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            lifespan="off", access_log=access_log)
    server = DrainingServer(config, engine, shutdown_timeout_s)
    exit_code = 0

    def on_dead(exc: Exception) -> None:
        nonlocal exit_code
        exit_code = 1
        logger.error("engine is dead (%s); stopping the server", exc)
        # /health answers 503 for a moment first, so health checks see the death, not just a gone port.
        asyncio.get_running_loop().call_later(DEAD_ENGINE_LINGER_S, setattr, server, "should_exit", True)

    engine.on_dead(on_dead)
    try:
        await server.serve()
    finally:
        await engine.shutdown()
    if not server.started and exit_code == 0:
        exit_code = 1  # e.g. the port was taken
    return exit_code


def _read_chat_template(value: str | None) -> str | None:
    """--chat-template takes a file path or the template text itself, as vLLM does."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:
        raise InvalidRequestError(f"--chat-template {value!r} is neither a file nor a Jinja template",
                                  param="chat_template")
    return value


async def run_server_async(args: Any) -> int:
    from pagedllm.engine.engine_args import EngineArgs

    engine_args = EngineArgs.from_cli_args(args)
    config = engine_args.create_engine_config()
    chat_template = config.model.chat_template or _read_chat_template(getattr(args, "chat_template", None))
    max_waiting = getattr(args, "max_waiting_requests", None)
    if max_waiting is not None and max_waiting < 0:
        raise InvalidRequestError(f"--max-waiting-requests must be >= 0, got {max_waiting}")
    dp_size = getattr(args, "data_parallel_size", 1) or 1
    if dp_size > 1:  # N engine cores behind this one server, routed by KV events and load
        from pagedllm.router.data_parallel import DataParallelLLM

        engine = await DataParallelLLM.from_config(config, dp_size, max_waiting_requests=max_waiting)
    else:
        engine = await AsyncLLM.from_config(config, max_waiting_requests=max_waiting)
    names = getattr(args, "served_model_name", None) or [engine.tokenizer_info.model_name]
    if isinstance(names, str):
        names = [names]
    settings = ServerSettings(
        served_model_names=list(names),
        api_key=getattr(args, "api_key", None) or os.environ.get("PAGEDLLM_API_KEY") or None,
        chat_template=chat_template,
        max_request_body_bytes=args.max_request_body_bytes,
        enable_tokenizer_info_endpoint=getattr(args, "enable_tokenizer_info_endpoint", False),
        enable_auto_tool_choice=bool(getattr(args, "enable_auto_tool_choice", False)),
        tool_call_parser=getattr(args, "tool_call_parser", None),
    )
    engine.metrics = ServerMetrics(settings.served_model_names[0])
    logger.info("serving %s on http://%s:%d", ", ".join(names), args.host, args.port)
    return await serve_engine(engine, settings, args.host, args.port, args.shutdown_timeout, args.uvicorn_log_level,
                              access_log=not getattr(args, "disable_uvicorn_access_log", False))


def run_server(args: Any) -> int:
    return asyncio.run(run_server_async(args))
