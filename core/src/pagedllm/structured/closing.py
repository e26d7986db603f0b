"""Closing JSON before the token budget runs out.

A JSON constraint bounds structure, not length: a string may go on until ``max_tokens`` (a small
model at temperature 0.8 sometimes does), and the request then ends with ``finish_reason
"length"`` and text that does not parse. Here each JSON-constrained sample tracks how many
brackets it has open and whether it is inside a string; once its remaining budget (``max_tokens``
or the context, whichever is nearer) is down to what closing them needs plus a small margin, its
allowed tokens are narrowed to those that only close (inside a string: ``"`` then any ``]`` /
``}``; outside: only ``]`` / ``}``) or stop, wherever the grammar allows one of them. An object still missing a required key cannot be closed; that row keeps
the grammar's full mask. Rows with room left are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

BRACKETS = frozenset("]}")
MARGIN = 2  # extra tokens kept in hand: a closer token may close less than one level


@dataclass(slots=True)
class JsonDepth:
    """Open brackets and string state of the JSON emitted so far (a lexer, not a validator)."""

    depth: int = 0
    in_string: bool = False
    escape: bool = False

    def feed(self, text: str) -> None:
        for ch in text:
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth = max(0, self.depth - 1)

    def tokens_to_close(self) -> int:
        """Tokens the shortest close takes: one per open level and string, and one to stop."""
        return self.depth + int(self.in_string) + 1


def pack_bits(allowed: torch.Tensor) -> torch.Tensor:
    """A bool [V] vector as the int32 bitmask words the grammar libraries write (bit t % 32 of word t // 32)."""
    width = (allowed.numel() + 31) // 32
    bits = torch.zeros(width * 32, dtype=torch.int64)
    bits[: allowed.numel()] = allowed.to(torch.int64)
    words = (bits.view(width, 32) << torch.arange(32, dtype=torch.int64)).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@dataclass(frozen=True, slots=True)
class ClosingVocab:
    """Every token's text (for the depth lexer) and the bitmasks of tokens that only close or stop."""

    texts: list[str]
    string_closers: torch.Tensor  # [ceil(V / 32)] int32: '"' then only brackets, or a stop token
    bracket_closers: torch.Tensor  # only ']' / '}', or a stop token

    @classmethod
    def build(cls, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> ClosingVocab:
        texts = list(tokenizer.batch_decode([[i] for i in range(min(vocab_size, len(tokenizer)))]))
        texts += [""] * (vocab_size - len(texts))
        string = torch.tensor([t[:1] == '"' and set(t[1:]) <= BRACKETS for t in texts], dtype=torch.bool)
        brackets = torch.tensor([bool(t) and set(t) <= BRACKETS for t in texts], dtype=torch.bool)
        for t in stop_token_ids:
            if 0 <= t < vocab_size:
                string[t] = brackets[t] = True
        return cls(texts=texts, string_closers=pack_bits(string), bracket_closers=pack_bits(brackets))

    def text(self, token_id: int) -> str:
        return self.texts[token_id] if 0 <= token_id < len(self.texts) else ""

    def narrow(self, row: torch.Tensor, depth: JsonDepth) -> None:
        """Keep only closing / stop tokens in one bitmask row, if the grammar allows any of them."""
        closing = row & (self.string_closers if depth.in_string else self.bracket_closers)
        if bool(closing.any()):
            row.copy_(closing)
