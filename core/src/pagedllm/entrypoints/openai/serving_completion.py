"""/v1/completions: prompt(s) in, choices out, as one JSON response or an SSE stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedllm.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    random_id,
)
from pagedllm.entrypoints.openai.serving_common import (
    SSE_DONE,
    AbortingStreamingResponse,
    ChoiceStream,
    OpenAIServing,
    merge_async_iterators,
    run_until_disconnect,
    sse,
    stop_holdback,
    stream_error_chunk,
)
from pagedllm.errors import ContextLengthExceededError
from pagedllm.outputs import CompletionOutput, PositionLogprobs, RequestOutput


def _visible(req: CompletionRequest, out: CompletionOutput) -> CompletionOutput:
    """What the client sees of an output: for echo-only requests (max_tokens 0), nothing generated."""
    if not req.echo_only:
        return out
    return CompletionOutput(index=out.index, text="", token_ids=[], logprobs=None if out.logprobs is None else [],
                            finish_reason="length" if out.finished() else None)


class OpenAIServingCompletion(OpenAIServing):
    def _logprobs(
        self, token_ids: list[int], positions: list[PositionLogprobs | None], text_offset: int
    ) -> CompletionLogprobs:
        out = CompletionLogprobs()
        offset = text_offset
        for tid, pos in zip(token_ids, positions, strict=False):
            tok = self.decode_token(tid, pos)
            out.tokens.append(tok)
            out.text_offset.append(offset)
            offset += len(tok)
            if pos is None:  # the first prompt token has no logprob
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            lp = pos.get(tid)
            out.token_logprobs.append(lp.logprob if lp is not None else None)
            out.top_logprobs.append({self.decode_token(t, pos): p.logprob for t, p in pos.items()})
        return out

    def _prompt_text(self, res: RequestOutput) -> str:
        return res.prompt if res.prompt is not None else self.tokenizer.decode(res.prompt_token_ids)

    def _echo_logprobs(self, res: RequestOutput) -> CompletionLogprobs:
        positions = list(res.prompt_logprobs or [None] * len(res.prompt_token_ids))
        return self._logprobs(res.prompt_token_ids, positions, 0)

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        params = req.to_sampling_params(self.defaults)
        prompts = req.prompts()
        base_id = random_id("cmpl")
        request_ids = [f"{base_id}-{i}" for i in range(len(prompts))]
        streams = []
        try:
            for rid, prompt in zip(request_ids, prompts, strict=True):
                streams.append(
                    self.engine.generate(prompt, params, rid, priority=req.priority, cache_salt=req.cache_salt)
                )
        except BaseException as exc:
            for rid in request_ids:
                self.engine.abort(rid)
            if isinstance(exc, ContextLengthExceededError):
                exc.param = "prompt"  # the processor cannot tell a completion's prompt from chat messages
            raise

        def abort_all() -> None:
            for rid in request_ids:
                self.engine.abort(rid)

        if req.stream:
            return AbortingStreamingResponse(self._stream(req, base_id, streams, params.stop), abort_all)
        response = await run_until_disconnect(raw, self._collect(req, base_id, streams), abort_all)
        return JSONResponse(response.model_dump())

    async def _collect(self, req: CompletionRequest, base_id: str, streams: list) -> CompletionResponse:
        finals: list[RequestOutput | None] = [None] * len(streams)
        async for i, res in merge_async_iterators(streams):
            finals[i] = res
        choices: list[CompletionChoice] = []
        usage = UsageInfo()
        for p, res in enumerate(finals):
            assert res is not None
            usage.prompt_tokens += len(res.prompt_token_ids)
            prefix = self._prompt_text(res) if req.echo else ""
            for out in (_visible(req, o) for o in res.outputs):
                usage.completion_tokens += len(out.token_ids)
                choices.append(self._choice(req, res, out, p * req.n + out.index, prefix))
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return CompletionResponse(id=base_id, model=self.model_name, choices=choices, usage=usage)

    def _choice(self, req: CompletionRequest, res: RequestOutput, out: CompletionOutput, index: int,
                prefix: str) -> CompletionChoice:
        logprobs = None
        if req.logprobs is not None:
            logprobs = CompletionLogprobs()
            if req.echo:
                logprobs = self._echo_logprobs(res)
            gen = self._logprobs(out.token_ids, list(out.logprobs or []), len(prefix))
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(logprobs, name).extend(getattr(gen, name))
        return CompletionChoice(
            index=index, text=prefix + out.text, logprobs=logprobs,
            finish_reason=out.finish_reason, stop_reason=out.stop_reason,
        )

    async def _stream(self, req: CompletionRequest, base_id: str, streams: list, stop: list[str]) -> AsyncIterator[str]:
        created = int(time.time())
        states: dict[int, ChoiceStream] = {}
        prompt_tokens: dict[int, int] = {}
        completion_tokens: dict[int, int] = {}
        holdback = stop_holdback(stop)
        try:
            async for p, res in merge_async_iterators(streams):
                prompt_tokens[p] = len(res.prompt_token_ids)
                choices = []
                for out in (_visible(req, o) for o in res.outputs):
                    index = p * req.n + out.index
                    st = states.get(index)
                    if st is None:
                        st = states[index] = ChoiceStream(holdback=holdback)
                    if st.finished:
                        continue
                    completion_tokens[index] = len(out.token_ids)
                    text, start, end = st.delta(out)
                    offset = st.extra.get("offset", 0)
                    logprobs = None
                    if st.first and req.echo:
                        prompt_text = self._prompt_text(res)
                        text = prompt_text + text
                        offset += len(prompt_text)
                        if req.logprobs is not None:
                            logprobs = self._echo_logprobs(res)
                    st.first = False
                    if req.logprobs is not None:
                        gen = self._logprobs(out.token_ids[start:end], list(out.logprobs or [])[start:end], offset)
                        if logprobs is None:
                            logprobs = gen
                        else:
                            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                                getattr(logprobs, name).extend(getattr(gen, name))
                        if gen.tokens:
                            offset = gen.text_offset[-1] + len(gen.tokens[-1])
                    st.extra["offset"] = offset
                    st.finished = out.finish_reason is not None
                    if not text and not st.finished and (logprobs is None or not logprobs.tokens):
                        continue
                    choices.append(CompletionChoice(
                        index=index, text=text, logprobs=logprobs,
                        finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                    ))
                if choices:
                    yield sse(CompletionChunk(id=base_id, created=created, model=self.model_name, choices=choices))
            if req.stream_options is not None and req.stream_options.include_usage:
                usage = UsageInfo(prompt_tokens=sum(prompt_tokens.values()),
                                  completion_tokens=sum(completion_tokens.values()))
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                yield sse(CompletionChunk(id=base_id, created=created, model=self.model_name, choices=[],
                                          usage=usage))
        except Exception as exc:
            yield stream_error_chunk(exc)
        yield SSE_DONE
