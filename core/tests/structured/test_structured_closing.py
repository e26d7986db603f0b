"""Closing JSON near the token budget: the bracket lexer, the bitmask packing and the narrowing."""

from __future__ import annotations

import torch

from pagedllm.model.testing import tiny_tokenizer
from pagedllm.structured.closing import ClosingVocab, JsonDepth, pack_bits


def test_the_lexer_counts_open_brackets_and_ignores_those_inside_strings():
    d = JsonDepth()
    d.feed('{"a": [1, {"b": "x]}\\"')
    assert (d.depth, d.in_string) == (3, True)
    assert d.tokens_to_close() == 5
    d.feed('"}], "c": "')
    assert (d.depth, d.in_string) == (1, True)
    d.feed('"}')
    assert (d.depth, d.in_string, d.tokens_to_close()) == (0, False, 1)


def test_pack_bits_sets_bit_t_mod_32_of_word_t_div_32():
    allowed = torch.zeros(70, dtype=torch.bool)
    allowed[[0, 31, 32, 69]] = True
    words = pack_bits(allowed)
    assert words.dtype == torch.int32 and words.tolist() == [1 - 2**31, 1, 1 << 5]


def test_narrowing_keeps_only_closers_the_grammar_allows_and_leaves_a_row_without_any():
    tok = tiny_tokenizer()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    vocab = ClosingVocab.build(tok, len(tok), [eos])
    quote, bracket, letter = (tok.convert_tokens_to_ids(t) for t in ('"', "]", "a"))
    allowed = torch.zeros(len(tok), dtype=torch.bool)
    allowed[[quote, bracket, letter]] = True
    in_string = JsonDepth(depth=1, in_string=True)
    row = pack_bits(allowed)
    vocab.narrow(row, in_string)  # inside a string only '"' closes: ']' would be text
    assert torch.equal(row, pack_bits(torch.nn.functional.one_hot(torch.tensor(quote), len(tok)).bool()))
    row = pack_bits(allowed)
    vocab.narrow(row, JsonDepth(depth=1))
    assert torch.equal(row, pack_bits(torch.nn.functional.one_hot(torch.tensor(bracket), len(tok)).bool()))
    only_letter = pack_bits(torch.nn.functional.one_hot(torch.tensor(letter), len(tok)).bool())
    row = only_letter.clone()
    vocab.narrow(row, in_string)  # nothing to close with: the grammar's mask stands
    assert torch.equal(row, only_letter)
