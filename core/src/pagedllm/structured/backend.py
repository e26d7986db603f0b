"""The grammar-library interface: compile a constraint, make a matcher per sequence, fill a batch of bitmasks.

A token bitmask is int32 ``[rows, ceil(vocab_size / 32)]``: bit ``t % 32`` of word ``t // 32`` set
means token ``t`` is allowed (the layout xgrammar and llguidance both write).
"""

from __future__ import annotations

import abc
import importlib.util
import json
import re
from typing import TYPE_CHECKING, Any

from pagedllm.errors import InvalidRequestError
from pagedllm.structured.params import BACKENDS, StructuredOutputsParams

if TYPE_CHECKING:  # the API server's process validates constraints here without loading torch
    import torch


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class GrammarMatcher(abc.ABC):
    """One sequence's position in its grammar; advanced with every accepted token."""

    @abc.abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar rejects it."""

    @abc.abstractmethod
    def is_terminated(self) -> bool:
        """The grammar is complete and accepted a stop token: nothing more may follow."""


class GrammarBackend(abc.ABC):
    """A grammar library bound to one tokenizer (built once per engine; building it takes ~1 s)."""

    name: str

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)

    @abc.abstractmethod
    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled constraint (thread-safe; called from a pool). Raises InvalidRequestError."""

    @abc.abstractmethod
    def matcher(self, compiled: Any) -> GrammarMatcher:
        """A fresh matcher at the grammar's start."""

    @abc.abstractmethod
    def fill_bitmask(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        """Write each matcher's allowed tokens into ``bitmask[rows[i]]``, all rows in one library call."""


def _library_message(exc: BaseException) -> str:
    """xgrammar prefixes its C++ errors with '[time] /path/file.cc:line: '; keep the sentence."""
    text = str(exc).strip()
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", text).strip()


JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def choice_ebnf(choices: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def require_library(backend: str) -> None:
    """A clear error when the grammar library is not installed (it comes with ``pagedllm[structured]``)."""
    module = {"xgrammar": "xgrammar", "llguidance": "llguidance"}.get(backend)
    if module is None:
        raise InvalidRequestError(f"unknown structured outputs backend {backend!r}; choose one of {BACKENDS}")
    if importlib.util.find_spec(module) is None:
        raise InvalidRequestError(
            f"structured outputs need the {backend} library, which is not installed on this server: "
            "pip install 'pagedllm[structured]'",
        )


def validate(params: StructuredOutputsParams, backend: str) -> None:
    """Check at admission, without a tokenizer, that ``backend`` can compile the constraint.

    Raises InvalidRequestError (HTTP 400) naming the constraint and the library's complaint.
    """
    require_library(backend)
    kind = params.kind
    try:
        if backend == "xgrammar":
            import xgrammar as xgr

            if kind == "json":
                xgr.Grammar.from_json_schema(params.schema_text(), strict_mode=True)
            elif kind == "regex":
                xgr.Grammar.from_regex(params.regex)
            elif kind == "grammar":
                xgr.Grammar.from_ebnf(params.grammar)
            elif kind == "choice":
                xgr.Grammar.from_ebnf(choice_ebnf(params.choice))
        elif backend == "llguidance":
            import llguidance as llg

            grammar = llguidance_grammar(params)
            is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
            if is_error:
                raise ValueError(messages[0] if messages else "invalid grammar")
        else:
            raise InvalidRequestError(f"unknown structured outputs backend {backend!r}; choose one of {BACKENDS}")
    except InvalidRequestError:
        raise
    except Exception as exc:  # the libraries raise RuntimeError/ValueError for a constraint they cannot compile
        what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar", "choice": "choice"}.get(kind, kind)
        raise InvalidRequestError(
            f"{params.origin}: the {what} cannot be compiled by {backend}: {_library_message(exc)}",
            param=params.origin,
        ) from None


def llguidance_grammar(params: StructuredOutputsParams) -> str:
    """The llguidance grammar text of a constraint."""
    import llguidance as llg

    kind = params.kind
    if kind in ("json", "json_object"):
        # Compact JSON with xgrammar's separators: no free whitespace, which small models may emit forever.
        schema = params.schema_text() if kind == "json" else '{"type": "object"}'
        return llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT)
    if kind == "choice":
        return llg.grammar_from("choice", json.dumps(params.choice))
    if kind == "regex":
        return llg.grammar_from("regex", params.regex)
    return llg.grammar_from("grammar", params.grammar)


def make_backend(name: str, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> GrammarBackend:
    if name == "xgrammar":
        from pagedllm.structured.xgrammar_backend import XGrammarBackend

        return XGrammarBackend(tokenizer, vocab_size, stop_token_ids)
    if name == "llguidance":
        from pagedllm.structured.llguidance_backend import LLGuidanceBackend

        return LLGuidanceBackend(tokenizer, vocab_size, stop_token_ids)
    raise ValueError(f"unknown structured outputs backend {name!r}; choose one of {', '.join(BACKENDS)}")
