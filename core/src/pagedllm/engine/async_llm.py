"""AsyncLLM: the server's engine handle — admission, the core process, per-request output streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.core_client import EngineCoreClient
from pagedllm.engine.core_process import DEFAULT_CORE_FACTORY, EngineReadyInfo, StepBatch
from pagedllm.engine.types import EngineCoreStats
from pagedllm.errors import (
    EngineDeadError,
    InvalidRequestError,
    PagedLLMError,
    QueueFullError,
    ServiceUnavailableError,
)
from pagedllm.metrics import ServerMetrics, StatLogger, kv_capacity_line
from pagedllm.outputs import RequestOutput
from pagedllm.sample.sampling_params import SamplingParams

logger = logging.getLogger("pagedllm.engine.async_llm")


class RequestFailedError(PagedLLMError):
    """The engine finished a request with an error (finish_reason "error")."""


@dataclass(slots=True)
class _RequestState:
    request_id: str
    arrival: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # RequestOutput | BaseException
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_generated: int = 0


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Outputs are cumulative; keep b, with any sample index b lacks taken from a (n > 1)."""
    if len(b.outputs) >= len(a.outputs):
        return b
    by_index = {o.index: o for o in a.outputs}
    by_index.update({o.index: o for o in b.outputs})
    b.outputs = [by_index[i] for i in sorted(by_index)]
    return b


def _preload_frontend_modules() -> None:
    import transformers  # noqa: F401

    import pagedllm.engine.input_processor  # noqa: F401
    import pagedllm.engine.output_processor  # noqa: F401


class AsyncLLM:
    """Input processing and output processing here; the EngineCore in its own process."""

    def __init__(
        self,
        client: EngineCoreClient,
        ready: EngineReadyInfo,
        *,
        max_waiting_requests: int | None = None,
        metrics: ServerMetrics | None = None,
        log_interval_s: float = 10.0,
    ) -> None:
        from pagedllm.engine.input_processor import InputProcessor
        from pagedllm.engine.output_processor import OutputProcessor

        self.client = client
        self.ready = ready
        self.config = ready.config
        tok = ready.tokenizer_info
        if tok is None:
            from pagedllm.model.loader import load_tokenizer

            tok = load_tokenizer(self.config.model)
        self.tokenizer_info = tok
        self.tokenizer = tok.tokenizer
        self.max_model_len = int(getattr(tok, "max_model_len", 0) or ready.max_model_len)
        self.input_processor = InputProcessor(self.config, tok, num_kv_blocks=ready.num_blocks or None)
        self.output_processor = OutputProcessor(tok.tokenizer)
        self.max_num_seqs = int(self.config.scheduler.max_num_seqs)
        self.max_waiting_requests = max_waiting_requests
        self.metrics = metrics
        self.stat_logger = StatLogger(log_interval_s)
        self.latest_stats = EngineCoreStats()
        self.dead_error: EngineDeadError | None = None
        self.draining = False
        self._requests: dict[str, _RequestState] = {}
        self._stats_event = asyncio.Event()
        self._on_dead: list[Callable[[EngineDeadError], None]] = []
        self._tasks: list[asyncio.Task] = []

    @classmethod
    async def from_config(
        cls,
        config: Any,
        *,
        core_factory: str = DEFAULT_CORE_FACTORY,
        max_waiting_requests: int | None = None,
        metrics_model_name: str | None = None,
        log_interval_s: float = 10.0,
        startup_timeout_s: float = 900.0,
    ) -> AsyncLLM:
        """Start the engine process, wait for the model to load, and start the output loop."""
        client = EngineCoreClient(config, core_factory=core_factory)
        starting = asyncio.create_task(client.start(timeout_s=startup_timeout_s))
        # While the engine process loads the model, import what the frontend needs (transformers
        # for the tokenizer it will unpickle): on a busy machine that is seconds saved.
        await asyncio.to_thread(_preload_frontend_modules)
        ready = await starting
        try:
            metrics = None
            if metrics_model_name is not None:
                metrics = ServerMetrics(metrics_model_name)
            engine = cls(
                client, ready, max_waiting_requests=max_waiting_requests, metrics=metrics,
                log_interval_s=log_interval_s,
            )
        except BaseException:
            client.shutdown()
            raise
        logger.info("platform: %s (%s)", ready.platform_name, ready.platform_why)
        logger.info(kv_capacity_line(ready.num_blocks, ready.block_size, engine.max_model_len))
        engine.start()
        return engine

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._output_loop(), name="pagedllm-output-loop"))
        if self.stat_logger.interval_s > 0:
            self._tasks.append(asyncio.create_task(self._log_loop(), name="pagedllm-stat-log"))

    # --- state ---------------------------------------------------------------------------------
    @property
    def is_dead(self) -> bool:
        return self.dead_error is not None

    @property
    def num_in_flight(self) -> int:
        return len(self._requests)

    def on_dead(self, callback: Callable[[EngineDeadError], None]) -> None:
        self._on_dead.append(callback)

    def _check_admission(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(f"engine is dead: {self.client.dead_reason or self.dead_error}")
        if self.draining:
            raise ServiceUnavailableError("server is shutting down; not accepting new requests")
        # Admission bound: the running batch (max_num_seqs) plus at most max_waiting_requests queued.
        if self.max_waiting_requests is not None:
            if len(self._requests) >= self.max_num_seqs + self.max_waiting_requests:
                raise QueueFullError(
                    f"server is at capacity ({self.max_num_seqs} running + {self.max_waiting_requests} "
                    "waiting requests); retry later"
                )

    # --- requests ------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Admit one request (raising at once if it cannot be) and return the iterator of its
        cumulative RequestOutputs. Closing or cancelling the iterator early aborts the request.
        """
        self._check_admission()
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in flight", param="request_id")
        arrival = arrival_time if arrival_time is not None else time.time()
        req = self.input_processor.process(
            request_id, prompt, params, arrival_time=arrival, priority=priority, cache_salt=cache_salt
        )
        state = _RequestState(request_id=request_id, arrival=arrival)
        self._requests[request_id] = state
        self.output_processor.add_request(req)
        try:
            self.client.add_request(req)
        except EngineDeadError:  # the engine process is gone: nothing of this request stays behind
            self._requests.pop(request_id, None)
            self.output_processor.abort_request(request_id)
            raise
        return self._stream(state)

    async def _stream(self, state: _RequestState) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await state.queue.get()
                while not isinstance(item, BaseException) and not state.queue.empty():
                    nxt = state.queue.get_nowait()
                    item = nxt if isinstance(nxt, BaseException) else _merge(item, nxt)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.error is not None:
                    finished = True
                    raise RequestFailedError(f"request {state.request_id} failed in the engine: {item.error}")
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(state.request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is; its stream ends with an aborted output. Idempotent."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return
        final = self.output_processor.abort_request(request_id)
        if final is not None:
            state.queue.put_nowait(final)
        else:
            state.queue.put_nowait(ServiceUnavailableError(f"request {request_id} was aborted"))
        if self.client.is_alive():
            try:
                self.client.abort_requests([request_id])
            except EngineDeadError as exc:  # nothing left to abort there; the output loop reports the death
                logger.debug("abort of %s not sent: %s", request_id, exc)
        if self.metrics is not None:
            self.metrics.observe_finished("abort", time.time() - state.arrival)

    def abort_all(self) -> None:
        for rid in list(self._requests):
            self.abort(rid)

    # --- the output loop -----------------------------------------------------------------------
    async def _output_loop(self) -> None:
        try:
            while True:
                kind, payload = await self.client.get_output()
                if kind == "outputs":
                    self._process_batch(payload)
                elif kind == "stats":
                    self._on_stats(payload)
                else:
                    logger.warning("unexpected engine message %r ignored", kind)
        except asyncio.CancelledError:
            raise
        except EngineDeadError as exc:
            if not self.client._closed:
                logger.error("engine died: %s", self.client.dead_reason or exc)
            self._fail_all(exc)
        except Exception as exc:  # a frontend bug here would silently hang every request: fail loudly
            logger.exception("output processing failed; shutting the engine down")
            self._fail_all(EngineDeadError(f"output processing failed: {type(exc).__name__}: {exc}"))

    def _process_batch(self, batch: StepBatch) -> None:
        outputs, stop_ids = self.output_processor.process_outputs(batch.outputs)
        if stop_ids:
            self.client.abort_requests(list(stop_ids))
        now = time.time()
        for out in outputs:
            state = self._requests.get(out.request_id)
            if state is None:
                continue  # aborted meanwhile
            total = sum(len(o.token_ids) for o in out.outputs)
            new = total - state.num_generated
            if new > 0 and self.metrics is not None:
                if state.first_token_time is None:
                    self.metrics.observe_first_token(now - state.arrival, batch.step_start - state.arrival)
                    if new > 1:
                        self.metrics.observe_inter_token(0.0, new - 1)
                else:
                    self.metrics.observe_inter_token(now - (state.last_token_time or now), new)
            if new > 0:
                state.first_token_time = state.first_token_time or now
                state.last_token_time = now
                state.num_generated = total
            state.queue.put_nowait(out)
            if out.finished:
                del self._requests[out.request_id]
                if self.metrics is not None:
                    reason = "error" if out.error else (out.outputs[0].finish_reason if out.outputs else None)
                    self.metrics.observe_finished(reason, now - state.arrival)
        self._on_stats(batch.stats)

    def _on_stats(self, stats: EngineCoreStats) -> None:
        self.latest_stats = stats
        if self.metrics is not None:
            self.metrics.observe_engine_stats(stats)
        self._stats_event.set()

    async def fresh_stats(self, timeout_s: float = 1.0) -> EngineCoreStats:
        """Ask the core for its current figures (used by /metrics); falls back to the latest seen."""
        if self.dead_error is None and self.client.is_alive():
            self._stats_event.clear()
            try:
                self.client.request_stats()
            except EngineDeadError as exc:
                logger.debug("engine stats not requested: %s", exc)
                return self.latest_stats
            try:
                await asyncio.wait_for(self._stats_event.wait(), timeout_s)
            except asyncio.TimeoutError:
                logger.debug("engine stats did not arrive within %.1f s", timeout_s)
        return self.latest_stats

    def _fail_all(self, exc: EngineDeadError) -> None:
        self.dead_error = exc
        for state in self._requests.values():
            state.queue.put_nowait(exc)
        self._requests.clear()
        self.client.shutdown(timeout_s=1.0)
        for cb in self._on_dead:
            cb(exc)

    async def _log_loop(self) -> None:
        while self.dead_error is None:
            await asyncio.sleep(self.stat_logger.interval_s)
            self.stat_logger.log(self.latest_stats)

    async def shutdown(self) -> None:
        """Abort what is left, stop the tasks, and stop (or kill) the engine process."""
        self.draining = True
        self.abort_all()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await asyncio.to_thread(self.client.shutdown)
