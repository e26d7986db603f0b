"""The native apply_token_bitmask op: disallowed tokens of the indexed rows become -inf, nothing else moves."""

from __future__ import annotations

import math

import torch

from pagedllm.ops import OPS, native


def _bitmask_from_allowed(allowed: torch.Tensor) -> torch.Tensor:  # [M, V] bool -> [M, ceil(V / 32)] int32
    m, v = allowed.shape
    words = torch.zeros(m, (v + 31) // 32, dtype=torch.int64)
    for t in range(v):
        words[:, t // 32] |= allowed[:, t].long() << (t % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def test_masked_rows_keep_exactly_their_allowed_tokens_and_other_rows_are_untouched() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 70, generator=gen)
    allowed = torch.rand(2, 70, generator=gen) < 0.3
    allowed[:, 31] = True  # bit 31: the sign bit of its word
    indices = torch.tensor([3, 1])
    before = logits.clone()
    out = native.apply_token_bitmask(logits, _bitmask_from_allowed(allowed), indices)
    assert out is logits
    for i, row in enumerate(indices.tolist()):
        expected = torch.where(allowed[i], before[row], torch.tensor(-math.inf))
        assert torch.equal(logits[row], expected)
    for row in (0, 2, 4):
        assert torch.equal(logits[row], before[row])


def test_tokens_past_the_bitmask_width_are_left_alone() -> None:
    logits = torch.zeros(1, 40)
    bitmask = torch.zeros(1, 1, dtype=torch.int32)  # covers tokens 0..31, all disallowed
    native.apply_token_bitmask(logits, bitmask, torch.tensor([0]))
    assert torch.isinf(logits[0, :32]).all() and (logits[0, 32:] == 0).all()


def test_no_constrained_rows_is_a_no_op_and_the_op_is_registered() -> None:
    logits = torch.randn(2, 8)
    before = logits.clone()
    native.apply_token_bitmask(logits, torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int64))
    assert torch.equal(logits, before)
    assert "apply_token_bitmask" in OPS.names()
