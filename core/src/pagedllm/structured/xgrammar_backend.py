"""xgrammar as the grammar library (the default, as in vLLM)."""

from __future__ import annotations

from typing import Any

import torch
import xgrammar as xgr

from pagedllm.errors import InvalidRequestError
from pagedllm.structured.backend import GrammarBackend, GrammarMatcher, _library_message, choice_ebnf
from pagedllm.structured.params import StructuredOutputsParams


class XGrammarMatcher(GrammarMatcher):
    __slots__ = ("inner",)

    def __init__(self, inner: xgr.GrammarMatcher) -> None:
        self.inner = inner

    def accept_token(self, token_id: int) -> bool:
        return bool(self.inner.accept_token(token_id))

    def is_terminated(self) -> bool:
        return bool(self.inner.is_terminated())


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        super().__init__(tokenizer, vocab_size, stop_token_ids)
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids) or None
        )
        # Our own pool calls compile; xgrammar's internal threads parallelise one compilation.
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=1)

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        kind = params.kind
        try:
            if kind == "json":
                # Compact JSON (no free whitespace): small models otherwise may emit whitespace forever.
                return self.compiler.compile_json_schema(params.schema_text(), any_whitespace=False, strict_mode=True)
            if kind == "json_object":
                return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return self.compiler.compile_regex(params.regex)
            if kind == "choice":
                return self.compiler.compile_grammar(choice_ebnf(params.choice))
            return self.compiler.compile_grammar(params.grammar)
        except RuntimeError as exc:
            raise InvalidRequestError(
                f"{params.origin}: xgrammar cannot compile the {kind}: {_library_message(exc)}", param=params.origin
            ) from None

    def matcher(self, compiled: xgr.CompiledGrammar) -> XGrammarMatcher:
        return XGrammarMatcher(xgr.GrammarMatcher(compiled))

    def fill_bitmask(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        inner = [m.inner for m in matchers]  # type: ignore[attr-defined]
        self.batch.batch_fill_next_token_bitmask(inner, bitmask, rows)
