"""The Triton apply_token_bitmask kernel against the native op (interpreted on CPU when there is no GPU)."""

from __future__ import annotations

import torch

from pagedllm.kernels.triton import LaunchConfig, token_bitmask
from pagedllm.ops import native


def test_triton_bitmask_matches_native_across_tiles_and_leaves_other_rows(device) -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 100, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 4), generator=gen, dtype=torch.int64).to(torch.int32)
    indices = torch.tensor([5, 0, 2])
    expected = native.apply_token_bitmask(logits.clone(), bitmask, indices)
    got = token_bitmask.apply_token_bitmask(logits.to(device), bitmask.to(device), indices.to(device),
                                            config=LaunchConfig(block_n=32))
    assert torch.equal(got.cpu(), expected)


def test_triton_bitmask_with_no_rows_is_a_no_op(device) -> None:
    logits = torch.randn(2, 40, device=device)
    before = logits.clone()
    token_bitmask.apply_token_bitmask(logits, torch.zeros(0, 2, dtype=torch.int32, device=device),
                                      torch.zeros(0, dtype=torch.int64, device=device), config=LaunchConfig())
    assert torch.equal(logits, before)
