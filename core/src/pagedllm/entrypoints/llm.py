"""LLM: the offline batch API, ``LLM(model).generate(prompts, SamplingParams)`` like vLLM's."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.errors import InvalidRequestError
from pagedllm.outputs import RequestOutput
from pagedllm.sample.sampling_params import SamplingParams

PromptType = str | list[int] | dict


class LLM:
    """An in-process engine. ``model=None`` runs the embedded SmolLM2-135M-Instruct."""

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.llm_engine = LLMEngine.from_engine_args(model=model, **engine_args)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.get_tokenizer()

    def shutdown(self) -> None:
        """Stop the engine's worker processes now (they also stop when the LLM is collected or at exit)."""
        self.llm_engine.engine_core.shutdown()

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's default: SamplingParams() updated with the model's generation_config sampling fields."""
        fields = {f.name for f in dataclasses.fields(SamplingParams)}
        defaults = {
            k: v for k, v in self.llm_engine.tokenizer_info.generation_defaults.items() if k in fields
        }
        return SamplingParams(**defaults)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt (text, token ids, or {"prompt"|"prompt_token_ids": ...}); outputs in input order."""
        return self._run(self._normalize_prompts(prompts), sampling_params, use_tqdm, priority, True)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Render each conversation with the chat template, then generate (the template adds BOS itself)."""
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages must be a non-empty list", param="messages")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        proc = self.llm_engine.input_processor
        texts = [
            proc.apply_chat_template(conv, add_generation_prompt, chat_template, **template_kwargs)
            for conv in conversations
        ]
        return self._run(texts, sampling_params, use_tqdm, None, False)

    @staticmethod
    def _normalize_prompts(prompts: PromptType | Sequence[PromptType]) -> list[str | list[int]]:
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]
        out: list[str | list[int]] = []
        for p in prompts:
            if isinstance(p, dict):
                if "prompt_token_ids" in p:
                    p = list(p["prompt_token_ids"])
                elif "prompt" in p:
                    p = p["prompt"]
                else:
                    raise InvalidRequestError(
                        "a prompt dict needs 'prompt' or 'prompt_token_ids'", param="prompt"
                    )
            out.append(p)
        return out

    def _run(
        self,
        prompts: list[str | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool,
        priority: Sequence[int] | None,
        add_special_tokens: bool,
    ) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise InvalidRequestError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        if len(priorities) != len(prompts):
            raise InvalidRequestError(f"got {len(prompts)} prompts but {len(priorities)} priorities")

        engine = self.llm_engine
        # Validate everything before queueing anything, so one bad prompt leaves the engine idle.
        reqs = [
            engine.input_processor.process(
                str(next(self._ids)), p, sp, priority=pr, add_special_tokens=add_special_tokens
            )
            for p, sp, pr in zip(prompts, params, priorities, strict=True)
        ]
        order = {r.request_id: i for i, r in enumerate(reqs)}
        for r in reqs:
            engine.add_processed_request(r)

        results: list[RequestOutput | None] = [None] * len(reqs)
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(reqs), desc="Processed prompts", dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            engine.abort_request([r.request_id for r in reqs if results[order[r.request_id]] is None])
            raise
        finally:
            if bar is not None:
                bar.close()
        missing = [r.request_id for r in reqs if results[order[r.request_id]] is None]
        if missing:
            raise RuntimeError(f"engine stopped without finishing requests {missing}")
        return results  # type: ignore[return-value]
