"""llguidance as the grammar library (``--structured-outputs-backend llguidance``)."""

from __future__ import annotations

from typing import Any

import llguidance as llg
import llguidance.hf
import llguidance.torch
import torch

from pagedllm.errors import InvalidRequestError
from pagedllm.structured.backend import GrammarBackend, GrammarMatcher, llguidance_grammar
from pagedllm.structured.params import StructuredOutputsParams


class LLGuidanceMatcher(GrammarMatcher):
    __slots__ = ("inner",)

    def __init__(self, inner: llg.LLMatcher) -> None:
        self.inner = inner

    def accept_token(self, token_id: int) -> bool:
        return bool(self.inner.consume_token(token_id))

    def is_terminated(self) -> bool:
        return bool(self.inner.is_stopped())


class LLGuidanceBackend(GrammarBackend):
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        super().__init__(tokenizer, vocab_size, stop_token_ids)
        self.tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab_size, eos_token=list(stop_token_ids) or None
        )
        self.executor = llg.LLExecutor(num_threads=1)

    def compile(self, params: StructuredOutputsParams) -> str:
        grammar = llguidance_grammar(params)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise InvalidRequestError(
                f"{params.origin}: llguidance cannot compile the {params.kind}: {messages[0] if messages else ''}",
                param=params.origin,
            )
        return grammar  # llguidance compiles lazily, per matcher

    def matcher(self, compiled: str) -> LLGuidanceMatcher:
        inner = llg.LLMatcher(self.tokenizer, compiled)
        if inner.is_error():
            raise InvalidRequestError(f"llguidance rejected the grammar: {inner.get_error()}")
        return LLGuidanceMatcher(inner)

    def fill_bitmask(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        pairs = [(m.inner, r) for m, r in zip(matchers, rows, strict=True)]  # type: ignore[attr-defined]
        llguidance.torch.fill_next_token_bitmask_par(self.executor, pairs, bitmask)
