"""The CPU apply_token_bitmask op (a C pass over the packed words) against the core's native op."""

from __future__ import annotations

import pytest
import torch
from pagedllm.plugin import native_ops
from pagedllm_cpu import ops as cpu_ops
from pagedllm_cpu.kernels import clib

KERNELS, WHY = clib.status()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason=f"CPU kernels unavailable: {WHY}")


def _random_case(rows: int, vocab: int, constrained: list[int], seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (len(constrained), words), generator=gen, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32)
    bitmask[0, 0] = -1  # a fully allowed word (skipped by the kernel)
    return logits, bitmask, torch.tensor(constrained, dtype=torch.int64)


@needs_kernels
@pytest.mark.parametrize("vocab", [32, 49152, 49153], ids=["one-word", "smollm", "ragged"])
def test_cpu_bitmask_equals_native_and_leaves_unconstrained_rows(vocab):
    logits, bitmask, indices = _random_case(4, vocab, [2, 0], seed=vocab)
    expected = native_ops.apply_token_bitmask(logits.clone(), bitmask, indices)
    got = cpu_ops.apply_token_bitmask(logits, bitmask, indices)
    assert got is logits
    assert torch.equal(got, expected)


def test_layouts_the_kernel_does_not_take_fall_back_to_native():
    logits, bitmask, indices = _random_case(3, 64, [1], seed=3)
    half = logits.half()
    got = cpu_ops.apply_token_bitmask(half.clone(), bitmask, indices)
    assert torch.equal(got, native_ops.apply_token_bitmask(half.clone(), bitmask, indices))


@needs_kernels
def test_out_of_range_rows_are_an_error_not_a_wild_write():
    logits, bitmask, _ = _random_case(2, 64, [0], seed=4)
    with pytest.raises(IndexError):
        cpu_ops.apply_token_bitmask(logits, bitmask, torch.tensor([5]))
