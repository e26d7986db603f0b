"""IncrementalDetokenizer: turns one sequence's new token ids into new text, a constant amount of work per token."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

# Prompt tokens decoded before the first output token, so that it decodes in context (e.g. a
# sentencepiece "▁word" keeps its leading space, which decoding it alone would strip).
_PROMPT_CONTEXT = 5
# A UTF-8 character spans at most 4 bytes, hence at most 4 byte tokens: a tail still unfinished
# after more pending tokens than that is genuinely invalid and is emitted as U+FFFD.
_MAX_PENDING = 8
# Ids before the prefix offset are dropped once this many have piled up (amortised O(1)).
_TRIM_AT = 64

_REPLACEMENT = "\ufffd"


def make_decode_fn(
    tokenizer: Any, skip_special_tokens: bool, spaces_between_special_tokens: bool
) -> Callable[[list[int]], str]:
    """``ids -> text`` for this tokenizer; fast tokenizers decode straight through their Rust backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "decode"):
        # HF fast tokenizers ignore spaces_between_special_tokens too (it is a slow-tokenizer option).
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    if hasattr(tokenizer, "decode_batch") and not hasattr(tokenizer, "convert_ids_to_tokens"):
        # A bare ``tokenizers.Tokenizer``.
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids,
        skip_special_tokens=skip_special_tokens,
        spaces_between_special_tokens=spaces_between_special_tokens,
        clean_up_tokenization_spaces=False,
    )


class IncrementalDetokenizer:
    """Streams text for one sequence, as vLLM does, over a short window of token ids.

    ``prefix_offset:read_offset`` are tokens already emitted, kept only as context; the text of a new
    token is ``decode(ids[prefix:]) - decode(ids[prefix:read])``, so byte-level and byte-fallback
    pieces that only form a character together are held back until the character is complete
    (while the decoded tail ends with U+FFFD) and a multi-byte character is never split.
    Concatenating every delta (and ``flush()``) gives the sequence's text decoded in context.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._decode = make_decode_fn(tokenizer, skip_special_tokens, spaces_between_special_tokens)
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""  # everything emitted so far

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """Adds output tokens and returns the text they complete (possibly empty)."""
        delta = []
        for token_id in token_ids:
            self._ids.append(token_id)
            piece = self._next_piece(force=len(self._ids) - self._read_offset > _MAX_PENDING)
            if piece:
                delta.append(piece)
        out = "".join(delta)
        self.text += out
        return out

    def flush(self) -> str:
        """Emits whatever is held back (an unfinished character decodes as U+FFFD); for a finished sequence."""
        out = self._next_piece(force=True) if len(self._ids) > self._read_offset else ""
        self.text += out
        return out

    def _next_piece(self, force: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not force):
            if force:
                # Nothing visible (e.g. skipped special tokens): stop carrying them in the window.
                self._advance()
            return ""
        self._advance()
        return new_text[len(prefix_text) :]

    def _advance(self) -> None:
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self._prefix_offset >= _TRIM_AT:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
