"""OutputProcessor: turns EngineCoreOutputs into cumulative RequestOutputs (detokenize, stop strings, logprobs).

Output contract (for LLMEngine and the streaming server):

- ``process_outputs`` returns one ``RequestOutput`` per request that changed in this batch of
  core outputs. It is *cumulative*, like vLLM's default ``RequestOutputKind.CUMULATIVE``: each
  ``outputs[i]`` holds everything sample ``i`` has produced so far (``text``, ``token_ids``,
  ``logprobs``), in fresh lists the caller may keep.
- Cumulative fields only ever grow: a later ``text`` always starts with an earlier one, and so do
  ``token_ids`` and ``logprobs``. While a sample runs, its ``text`` holds back the last
  ``max(len(stop)) - 1`` characters (when ``stop`` is set and ``include_stop_str_in_output`` is
  not) so that a stop string completed by a later token never retracts streamed text; a finished
  sample shows its whole text. A streaming server therefore sends, per sample index,
  ``text[len(sent_text):]``, ``token_ids[len(sent_ids):]`` and ``logprobs[len(sent_logprobs):]``.
- ``finished`` is True once every sample has a ``finish_reason``; that output is the last one for
  the request. ``finish_reason`` is "stop" (EOS, a stop token id, or a stop string), "length",
  "abort" or "error" (``RequestOutput.error`` then holds the message).
- As vLLM: an EOS / stop token id that ended a sample is in ``token_ids`` but its text is not in
  ``text`` unless ``include_stop_str_in_output``; ``stop_reason`` is the stop token id (None for EOS)
  or the stop string. Text is cut before a stop string (after it with ``include_stop_str_in_output``).
- The second return value lists request ids the caller must abort in the EngineCore: requests that
  finished here (a stop string) while the core may still be generating for them. With ``n > 1`` a
  sample that meets a stop string is finished here at once, but the request is aborted only when
  all its samples are finished, because the core aborts whole requests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.detokenizer import IncrementalDetokenizer, make_decode_fn
from pagedllm.engine.types import EngineCoreOutput, EngineCoreRequest
from pagedllm.outputs import CompletionOutput, PositionLogprobs, RequestMetrics, RequestOutput
from pagedllm.sample.sampling_params import SamplingParams


@dataclass(slots=True)
class _SampleState:
    """One sample (index) of a request as the frontend sees it."""

    index: int
    detokenizer: IncrementalDetokenizer | None  # None when params.detokenize is False
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # full text so far; may be cut back by a stop string
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    stopped_here: bool = False  # finished by a stop string, so the core may still be running it


@dataclass(slots=True)
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_SampleState]
    metrics: RequestMetrics
    stop_buffer: int  # characters held back from a running sample's text (see module docstring)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class OutputProcessor:
    """Per-request frontend state: one incremental detokenizer per sample, stop strings, cumulative outputs."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _RequestState] = {}
        self._decode_token = make_decode_fn(tokenizer, False, True) if tokenizer is not None else None
        self._token_text: dict[int, str] = {}  # decoded_token cache for logprobs

    def __len__(self) -> int:
        return len(self._requests)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    def add_request(self, req: EngineCoreRequest) -> None:
        if req.request_id in self._requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        params = req.sampling_params
        detokenize = params.detokenize and self.tokenizer is not None

        def detokenizer() -> IncrementalDetokenizer | None:
            if not detokenize:
                return None
            return IncrementalDetokenizer(
                self.tokenizer,
                req.prompt_token_ids,
                params.skip_special_tokens,
                params.spaces_between_special_tokens,
            )

        max_stop_len = max((len(s) for s in params.stop), default=0) if detokenize else 0
        self._requests[req.request_id] = _RequestState(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            params=params,
            samples=[
                _SampleState(
                    index=i,
                    detokenizer=detokenizer(),
                    logprobs=[] if params.logprobs is not None else None,
                    cumulative_logprob=0.0 if params.logprobs is not None else None,
                )
                for i in range(params.n)
            ],
            metrics=RequestMetrics(arrival_time=req.arrival_time),
            stop_buffer=max_stop_len - 1 if max_stop_len and not params.include_stop_str_in_output else 0,
        )

    def process_outputs(self, outs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Applies one step's core outputs; returns the changed requests' outputs and the ids to abort."""
        now = time.time()
        changed: dict[str, _RequestState] = {}
        to_abort: list[str] = []
        for out in outs:
            state = self._requests.get(out.request_id)
            if state is None or not 0 <= out.index < len(state.samples):
                continue  # already finished or aborted here; the core may lag by a step
            sample = state.samples[out.index]
            if sample.finish_reason is not None:
                continue  # e.g. a sample of n > 1 stopped by a stop string that the core still runs
            changed[state.request_id] = state
            if out.prompt_logprobs is not None and state.prompt_logprobs is None:
                state.prompt_logprobs = [self._with_text(state, p) for p in out.prompt_logprobs]
            state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
            if out.finish_reason == "error":
                self._fail(state, out.error or "the engine failed this request")
                continue
            if out.new_token_ids:
                if state.metrics.first_token_time is None:
                    state.metrics.first_token_time = now
                state.metrics.last_token_time = now
                self._append(state, sample, out)
            if out.finish_reason is not None and sample.finish_reason is None:
                sample.finish_reason = out.finish_reason
                sample.stop_reason = out.stop_reason
                if sample.detokenizer is not None:
                    sample.text += sample.detokenizer.flush()

        results = []
        for state in changed.values():
            if state.finished:
                state.metrics.finished_time = now
                del self._requests[state.request_id]
                # The core may still be running it: finished here by a stop string, or failed.
                if state.error is not None or any(s.stopped_here for s in state.samples):
                    to_abort.append(state.request_id)
            results.append(self._make_output(state))
        return results, to_abort

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Forgets the request; returns its final output (unfinished samples get "abort"), or None if unknown."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        for sample in state.samples:
            if sample.finish_reason is None:
                sample.finish_reason = "abort"
        state.metrics.finished_time = time.time()
        return self._make_output(state)

    def _append(self, state: _RequestState, sample: _SampleState, out: EngineCoreOutput) -> None:
        params = state.params
        new_ids = out.new_token_ids
        num_before = len(sample.token_ids)
        sample.token_ids.extend(new_ids)
        if sample.logprobs is not None and out.new_logprobs:
            for tok, pos in zip(new_ids, out.new_logprobs, strict=False):  # a short list must not crash us
                sample.logprobs.append(self._with_text(state, pos))
                if tok in pos:
                    sample.cumulative_logprob += pos[tok].logprob
        if sample.detokenizer is None:
            return
        # The EOS / stop token that ended the sample is not part of the text (vLLM).
        stop_terminated = out.finish_reason == "stop"
        text_ids = new_ids[:-1] if stop_terminated and not params.include_stop_str_in_output else new_ids
        before = len(sample.text)
        # Stop strings count only in text after min_tokens output tokens (vLLM).
        num_early = max(0, min(len(text_ids), params.min_tokens - num_before))
        if num_early:
            sample.text += sample.detokenizer.add_tokens(text_ids[:num_early])
            before = len(sample.text)
        sample.text += sample.detokenizer.add_tokens(text_ids[num_early:])
        if stop_terminated or not params.stop:
            return
        if self._check_stop_strings(state, sample, before):
            # Only a sample the core is still running needs aborting there.
            sample.stopped_here = out.finish_reason is None

    @staticmethod
    def _check_stop_strings(state: _RequestState, sample: _SampleState, new_from: int) -> bool:
        """Finds the earliest stop string that ends in the text past ``new_from``; cuts the text there."""
        text = sample.text
        if len(text) <= new_from:
            return False
        best: tuple[int, str] | None = None
        for stop in state.params.stop:
            # Only text past new_from is new, so a match must end there.
            at = text.find(stop, max(0, new_from - len(stop) + 1))
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return False
        at, stop = best
        sample.text = text[: at + len(stop)] if state.params.include_stop_str_in_output else text[:at]
        sample.finish_reason = "stop"
        sample.stop_reason = stop
        return True

    def _fail(self, state: _RequestState, message: str) -> None:
        state.error = message
        for sample in state.samples:
            if sample.finish_reason is None:
                sample.finish_reason = "error"

    def _with_text(self, state: _RequestState, pos: PositionLogprobs | None) -> PositionLogprobs | None:
        """Fills decoded_token (each token decoded on its own, as vLLM does) on one position's logprobs."""
        if pos is None or self._decode_token is None or not state.params.detokenize:
            return pos
        for tok, lp in pos.items():
            if lp.decoded_token is None:
                text = self._token_text.get(tok)
                if text is None:
                    text = self._token_text[tok] = self._decode_token([tok])
                lp.decoded_token = text
        return pos

    @staticmethod
    def _make_output(state: _RequestState) -> RequestOutput:
        outputs = []
        for s in state.samples:
            text = s.text
            if s.finish_reason is None and state.stop_buffer:
                text = text[: max(0, len(text) - state.stop_buffer)]
            outputs.append(
                CompletionOutput(
                    index=s.index,
                    text=text,
                    token_ids=list(s.token_ids),
                    cumulative_logprob=s.cumulative_logprob,
                    logprobs=list(s.logprobs) if s.logprobs is not None else None,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                )
            )
        m = state.metrics
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=outputs,
            finished=state.finished,
            prompt_logprobs=state.prompt_logprobs,
            num_cached_tokens=state.num_cached_tokens,
            metrics=RequestMetrics(
                m.arrival_time, m.first_scheduled_time, m.first_token_time, m.last_token_time, m.finished_time
            ),
            error=state.error,
        )
