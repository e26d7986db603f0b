"""What completions and chat serving share: the model check, SSE framing, stream merging, text deltas."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.errors import ModelNotFoundError, PagedLLMError
from pagedllm.outputs import CompletionOutput, PositionLogprobs

logger = logging.getLogger("pagedllm.entrypoints.openai")
T = TypeVar("T")


@dataclass(slots=True)
class ServerSettings:
    """Server options that are not engine options."""

    served_model_names: list[str]
    api_key: str | None = None
    chat_template: str | None = None  # template text overriding the model's
    max_request_body_bytes: int = 8 * 1024 * 1024
    response_role: str = "assistant"
    enable_tokenizer_info_endpoint: bool = False  # GET /tokenizer_info (it exposes the chat template)
    enable_auto_tool_choice: bool = False  # tool_choice "auto" may return tool calls
    tool_call_parser: str | None = None  # a name in tool_parsers.TOOL_PARSERS


class OpenAIServing:
    """Base of the completion and chat handlers."""

    def __init__(self, engine: AsyncLLM, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.tokenizer = engine.tokenizer
        self.defaults = dict(getattr(engine.tokenizer_info, "generation_defaults", None) or {})

    @property
    def model_name(self) -> str:
        return self.settings.served_model_names[0]

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.settings.served_model_names:
            raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def decode_token(self, token_id: int, pos: PositionLogprobs | None) -> str:
        if pos is not None:
            lp = pos.get(token_id)
            if lp is not None and lp.decoded_token is not None:
                return lp.decoded_token
        return self.tokenizer.decode([token_id])


def sse(payload: Any) -> str:
    if hasattr(payload, "model_dump_json"):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def stream_error_chunk(exc: BaseException) -> str:
    if isinstance(exc, PagedLLMError):
        return sse(exc.to_openai())
    logger.exception("streaming failed", exc_info=exc)
    return sse({"error": {"message": f"internal error: {type(exc).__name__}", "type": "internal_error",
                          "param": None, "code": None}})


class AbortingStreamingResponse(StreamingResponse):
    """A streaming response that aborts its requests however it ends (disconnect included)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def merge_async_iterators(iterators: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators, yielding (which, item); cancels the rest on exit."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
            await queue.put((i, done))
        except Exception as exc:
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(iterators)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


async def run_until_disconnect(request: Request, work: Awaitable[T], on_disconnect: Callable[[], None]) -> T:
    """Await ``work`` unless the client goes away first; then cancel it and call on_disconnect."""
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.create_task(wait_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            on_disconnect()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if task.cancelled():
        raise asyncio.CancelledError("client disconnected")
    return task.result()


@dataclass(slots=True)
class ChoiceStream:
    """How much of one choice a stream has sent, so each chunk carries only what is new.

    Text that might be the start of a stop string is held back until it is known not to be one,
    so the stream never sends text that the final (stop-truncated) output drops.
    """

    holdback: int = 0
    sent_text: int = 0
    sent_tokens: int = 0
    finished: bool = False
    first: bool = True
    extra: dict = field(default_factory=dict)

    def delta(self, out: CompletionOutput) -> tuple[str, int, int]:
        """(new text, first new token index, end token index)."""
        text = out.text
        limit = len(text) if out.finish_reason is not None else max(self.sent_text, len(text) - self.holdback)
        new_text = text[self.sent_text:limit]
        self.sent_text = max(self.sent_text, limit)
        start, end = self.sent_tokens, len(out.token_ids)
        self.sent_tokens = end
        return new_text, start, end


def stop_holdback(stop: list[str]) -> int:
    return max((len(s) for s in stop), default=1) - 1
