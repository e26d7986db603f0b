"""/v1/chat/completions: messages through the chat template, one assistant turn out (JSON or SSE)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedllm.entrypoints.openai.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
    random_id,
)
from pagedllm.entrypoints.openai.serving_common import (
    SSE_DONE,
    AbortingStreamingResponse,
    ChoiceStream,
    OpenAIServing,
    run_until_disconnect,
    sse,
    stop_holdback,
    stream_error_chunk,
)
from pagedllm.entrypoints.openai import chat_tool_calls as tool_calls
from pagedllm.entrypoints.openai.chat_tool_calls import make_parser
from pagedllm.entrypoints.openai.structured_request import ToolMode, tool_mode
from pagedllm.entrypoints.openai.tool_parsers import ToolParser
from pagedllm.errors import InvalidRequestError
from pagedllm.outputs import PositionLogprobs, RequestOutput


class OpenAIServingChat(OpenAIServing):
    def render_prompt(self, messages: list[dict], add_generation_prompt: bool, continue_final_message: bool = False,
                      template_kwargs: dict | None = None) -> list[int]:
        """Apply the chat template (the --chat-template override first) and tokenize the result."""
        kwargs = dict(template_kwargs or {})
        if continue_final_message:
            if add_generation_prompt:
                raise InvalidRequestError(
                    "continue_final_message and add_generation_prompt cannot both be true",
                    param="continue_final_message",
                )
            kwargs["continue_final_message"] = True
        try:
            text = self.engine.input_processor.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, chat_template=self.settings.chat_template,
                **kwargs,
            )
        except InvalidRequestError:
            raise
        except Exception as exc:  # a template raising on this conversation is the request's problem
            raise InvalidRequestError(f"chat template failed: {type(exc).__name__}: {exc}", param="messages") from exc
        # The template writes the special tokens (BOS, role markers) itself.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _logprobs(self, token_ids: list[int], positions: list[PositionLogprobs], top_n: int) -> ChatChoiceLogprobs:
        content = []
        for tid, pos in zip(token_ids, positions, strict=False):
            tok = self.decode_token(tid, pos)
            chosen = pos.get(tid) if pos is not None else None
            ranked = sorted((pos or {}).items(), key=lambda kv: (kv[1].rank or 1 << 30, -kv[1].logprob))
            top = [
                TopLogprob(token=(t := self.decode_token(i, pos)), logprob=p.logprob, bytes=list(t.encode()))
                for i, p in ranked[:top_n]
            ]
            content.append(ChatTokenLogprob(
                token=tok, logprob=chosen.logprob if chosen is not None else float("-inf"),
                bytes=list(tok.encode()), top_logprobs=top,
            ))
        return ChatChoiceLogprobs(content=content)

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        params = req.to_sampling_params(self.defaults)
        mode = tool_mode(req)
        parser = make_parser(mode, self.settings.enable_auto_tool_choice, self.settings.tool_call_parser)
        template_kwargs = dict(req.chat_template_kwargs or {})
        if mode.kind != "none":
            template_kwargs["tools"] = mode.tools  # as transformers' apply_chat_template(tools=...)
        prompt_ids = self.render_prompt(
            req.template_messages(), req.add_generation_prompt, req.continue_final_message, template_kwargs
        )
        request_id = random_id("chatcmpl")
        stream = self.engine.generate(prompt_ids, params, request_id, priority=req.priority,
                                      cache_salt=req.cache_salt)

        def abort() -> None:
            self.engine.abort(request_id)

        if req.stream:
            return AbortingStreamingResponse(self._stream(req, request_id, stream, params.stop, mode, parser), abort)
        response = await run_until_disconnect(raw, self._collect(req, request_id, stream, mode, parser), abort)
        return JSONResponse(response.model_dump())

    async def _collect(self, req: ChatCompletionRequest, request_id: str, stream, mode: ToolMode,
                       parser: ToolParser | None) -> ChatCompletionResponse:
        final: RequestOutput | None = None
        async for res in stream:
            final = res
        assert final is not None
        choices = []
        completion_tokens = 0
        for out in final.outputs:
            completion_tokens += len(out.token_ids)
            logprobs = None
            if req.logprobs:
                logprobs = self._logprobs(out.token_ids, list(out.logprobs or []), req.top_logprobs or 0)
            content, calls = tool_calls.complete(mode, parser, out.text)
            choices.append(ChatCompletionChoice(
                index=out.index,
                message=ChatResponseMessage(role=self.settings.response_role, content=content, tool_calls=calls),
                logprobs=logprobs, finish_reason=tool_calls.finish_reason(mode, calls, out.finish_reason),
                stop_reason=out.stop_reason,
            ))
        prompt_tokens = len(final.prompt_token_ids)
        usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          total_tokens=prompt_tokens + completion_tokens)
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)

    async def _stream(self, req: ChatCompletionRequest, request_id: str, stream, stop: list[str], mode: ToolMode,
                      parser: ToolParser | None) -> AsyncIterator[str]:
        created = int(time.time())
        role = self.settings.response_role

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=self.model_name,
                                           choices=choices, usage=usage))

        states: dict[int, ChoiceStream] = {}
        tool_streams: dict[int, tool_calls.ToolCallStream] = {}
        holdback = stop_holdback(stop)
        prompt_tokens = 0
        completion_tokens: dict[int, int] = {}
        try:
            # The role comes first, once per choice, as OpenAI does.
            yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role=role, content="")) for i in range(req.n)])
            async for res in stream:
                prompt_tokens = len(res.prompt_token_ids)
                choices = []
                for out in res.outputs:
                    st = states.setdefault(out.index, ChoiceStream(holdback=holdback))
                    if st.finished:
                        continue
                    completion_tokens[out.index] = len(out.token_ids)
                    text, start, end = st.delta(out)
                    st.finished = out.finish_reason is not None
                    finish = out.finish_reason
                    deltas = None
                    if mode.kind != "none":
                        ts = tool_streams.setdefault(out.index, tool_calls.ToolCallStream(mode, parser))
                        text, deltas = ts.feed(text, st.finished)
                        deltas = deltas or None
                        finish = tool_calls.finish_reason(mode, ts.calls, finish)
                    logprobs = None
                    if req.logprobs and end > start:
                        logprobs = self._logprobs(out.token_ids[start:end], list(out.logprobs or [])[start:end],
                                                  req.top_logprobs or 0)
                    if not text and not st.finished and logprobs is None and not deltas:
                        continue
                    choices.append(ChatStreamChoice(
                        index=out.index, delta=DeltaMessage(content=text or None, tool_calls=deltas),
                        logprobs=logprobs, finish_reason=finish, stop_reason=out.stop_reason,
                    ))
                if choices:
                    yield chunk(choices)
            if req.stream_options is not None and req.stream_options.include_usage:
                total = sum(completion_tokens.values())
                yield chunk([], UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=total,
                                          total_tokens=prompt_tokens + total))
        except Exception as exc:
            yield stream_error_chunk(exc)
        yield SSE_DONE
