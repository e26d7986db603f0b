"""The TPU Pallas ragged paged attention kernel in jax's TPU-interpret mode, against the reference backend."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from pagedllm.plugin import AttentionBatch, AttentionSpec, ReferenceAttentionBackend

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax/jaxlib (tox -e xla)")


def token_layout(query_lens: list[int], seq_lens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    seq = np.repeat(np.arange(len(query_lens)), query_lens)
    pos = np.concatenate([np.arange(s - q, s) for q, s in zip(query_lens, seq_lens, strict=True)])
    return seq.astype(np.int32), pos.astype(np.int32)


def run_case(block_size: int, heads: int, kv_heads: int, query_lens: list[int], seq_lens: list[int],
             window: int | None = None, soft_cap: float | None = None, head_size: int = 32, seed: int = 0,
             plant: int | None = None, stale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    import jax.numpy as jnp

    from pagedllm_tpu.kernels.ragged_paged_attention import ragged_paged_attention

    g = torch.Generator().manual_seed(seed)
    width = max(-(-s // block_size) for s in seq_lens)
    num_blocks = len(seq_lens) * width + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()  # scattered pages, as a real pool hands out
    tables = [perm[i * width : i * width + -(-s // block_size)] for i, s in enumerate(seq_lens)]
    spec = AttentionSpec(heads, kv_heads, head_size, head_size**-0.5, torch.float32, block_size, window, soft_cap)
    ref = ReferenceAttentionBackend(spec)
    cache = ref.allocate_kv_cache(num_blocks, "cpu")
    cache.normal_(generator=g)  # stale values everywhere: a kernel reading past a sequence shows up
    if stale is not None:  # never-written slots (a freed block's NaN): past every sequence's end
        used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
        for t, n in zip(tables, seq_lens, strict=True):
            used.view(-1)[torch.tensor(t).repeat_interleave(block_size) * block_size
                          + torch.arange(block_size).repeat(len(t))] = True
            used[t[-1], (n - 1) % block_size + 1 :] = False
        cache[:, ~used] = stale
    T = sum(query_lens)
    q, k, v = (torch.randn(T, h, head_size, generator=g) for h in (heads, kv_heads, kv_heads))
    batch = AttentionBatch.build(query_lens, seq_lens, tables, block_size)
    expected = ref.forward(q, k, v, cache, batch)  # also writes the new keys/values into the cache
    padded = np.zeros((len(seq_lens), width), dtype=np.int32)
    for i, t in enumerate(tables):
        padded[i, : len(t)] = t
    if plant is not None:
        padded[0, 0] = plant
    seq, pos = token_layout(query_lens, seq_lens)
    out = ragged_paged_attention(
        jnp.asarray(q.numpy()), jnp.asarray(cache[0].numpy()), jnp.asarray(cache[1].numpy()),
        jnp.asarray(seq), jnp.asarray(pos), jnp.asarray(padded),
        scale=spec.scale, sliding_window=window, soft_cap=soft_cap, interpret=True,
    )
    return torch.from_numpy(np.array(out)), expected


MIXED = ([5, 1, 1, 3], [5, 17, 9, 20])  # a prefill, two decodes, a chunked prefill


@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 1), (6, 2)])
def test_kernel_matches_reference_on_a_mixed_batch(block_size: int, heads: int, kv_heads: int) -> None:
    got, expected = run_case(block_size, heads, kv_heads, *MIXED)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(("window", "soft_cap"), [(4, None), (None, 5.0), (7, 30.0)])
def test_kernel_matches_reference_with_sliding_window_and_soft_cap(window: int | None, soft_cap: float | None) -> None:
    got, expected = run_case(8, 4, 2, *MIXED, window=window, soft_cap=soft_cap, seed=1)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_kernel_matches_reference_on_long_prefill_and_decodes() -> None:
    got, expected = run_case(16, 8, 2, [40, 1, 1], [40, 70, 33], seed=2)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_kernel_ignores_nan_in_slots_past_each_sequence_end() -> None:
    # Sequence ends inside their last page (5, 17, 9, 20 tokens in pages of 8): the rest holds NaN.
    got, expected = run_case(8, 4, 2, *MIXED, seed=3, stale=float("nan"))
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_planted_out_of_range_block_index_is_caught_by_the_interpreter_bounds_check() -> None:
    with pytest.raises(Exception, match=r"Out-of-bounds read of .* reading \[\(10000,"):
        run_case(8, 4, 2, *MIXED, plant=10_000)
