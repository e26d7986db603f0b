"""InputProcessor: tokenizes, applies chat templates and validates requests at admission (never in the engine loop)."""

from __future__ import annotations

import copy
import time
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.engine.types import EngineCoreRequest
from pagedllm.errors import ContextLengthExceededError, InvalidRequestError
from pagedllm.sample.sampling_params import SamplingParams
from pagedllm.structured.backend import validate as validate_structured_outputs


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer_info: Any, num_kv_blocks: int | None = None) -> None:
        self.config = config
        self.tokenizer_info = tokenizer_info
        self.tokenizer = tokenizer_info.tokenizer
        self.vocab_size: int = tokenizer_info.vocab_size
        self.max_model_len: int = config.model.max_model_len or tokenizer_info.max_model_len
        blocks = num_kv_blocks if num_kv_blocks is not None else config.cache.num_blocks
        # Tokens one sequence can hold if it had the whole KV cache to itself.
        self.kv_capacity: int | None = blocks * config.cache.block_size if blocks else None

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def process(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        add_special_tokens: bool = True,
    ) -> EngineCoreRequest:
        """A validated, tokenized request; raises InvalidRequestError / ContextLengthExceededError."""
        if isinstance(prompt, str):
            if prompt == "":
                raise InvalidRequestError("the prompt is empty", param="prompt")
            text: str | None = prompt
            token_ids = self.tokenize(prompt, add_special_tokens=add_special_tokens)
        elif isinstance(prompt, (list, tuple)):
            text = None
            token_ids = list(prompt)
            for t in token_ids:
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                    raise InvalidRequestError(
                        f"prompt token id {t!r} is outside the vocabulary (size {self.vocab_size})",
                        param="prompt",
                    )
        else:
            raise InvalidRequestError(
                f"prompt must be a string or a list of token ids, got {type(prompt).__name__}", param="prompt"
            )
        if not token_ids:
            raise InvalidRequestError("the prompt is empty (no tokens)", param="prompt")
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"expected SamplingParams, got {type(params).__name__}")

        max_seqs = self.config.scheduler.max_num_seqs
        if params.n > max_seqs:
            raise InvalidRequestError(
                f"n={params.n} exceeds the engine's max_num_seqs={max_seqs}; request at most {max_seqs} samples",
                param="n",
            )
        # A private copy: the caller may share one SamplingParams across prompts.
        params = copy.copy(params)
        params.stop = list(params.stop)
        params.stop_token_ids = list(params.stop_token_ids)
        params.check_vocab(self.vocab_size)
        if params.structured_outputs is not None:
            # Fails fast with a 400 naming what the grammar library could not compile.
            validate_structured_outputs(params.structured_outputs, self.config.structured_outputs.backend)
        params.eos_token_ids = list(self.tokenizer_info.eos_token_ids)
        n_prompt = len(token_ids)
        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - n_prompt
            if params.max_tokens < 1:
                raise ContextLengthExceededError(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt "
                    f"has {n_prompt} tokens, which leaves no room for a completion. Please reduce the length "
                    "of the prompt."
                )
            params.min_tokens = min(params.min_tokens, params.max_tokens)
        total = n_prompt + params.max_tokens
        if total > self.max_model_len:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({n_prompt} in the prompt, {params.max_tokens} for the completion "
                "(max_tokens)). Please reduce the length of the prompt or max_tokens."
            )
        if self.kv_capacity is not None and total > self.kv_capacity:
            raise ContextLengthExceededError(
                f"The request needs {total} tokens of KV cache ({n_prompt} in the prompt, {params.max_tokens} "
                f"for the completion (max_tokens)), but the whole KV cache holds {self.kv_capacity} tokens. "
                "Please reduce the length of the prompt or max_tokens, or start the engine with a larger "
                "--kv-cache-memory."
            )
        return EngineCoreRequest(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            arrival_time=time.time() if arrival_time is None else arrival_time,
            priority=priority,
            cache_salt=cache_salt,
            prompt=text,
        )

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kw: Any,
    ) -> str:
        """Render a conversation with (in order) the given, the configured, or the model's template."""
        template = chat_template or self.config.model.chat_template or self.tokenizer_info.chat_template
        if template is None:
            raise InvalidRequestError(
                "this model has no chat template; pass one with --chat-template or chat_template=...",
                param="chat_template",
            )
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InvalidRequestError(
                "messages must be a list of {'role': ..., 'content': ...} objects", param="messages"
            )
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=template,
                **kw,
            )
        except (
            Exception
        ) as exc:  # a template error is the request's fault (or the template's), never the engine's
            raise InvalidRequestError(
                f"chat template failed: {type(exc).__name__}: {exc}", param="messages"
            ) from exc
