"""The Triton paged attention and KV write kernels against the reference backend."""

from __future__ import annotations

import pytest
import torch

from pagedllm.attention.backend import AttentionBatch, AttentionSpec
from pagedllm.attention.reference import ReferenceAttentionBackend
from pagedllm.kernels.triton import LaunchConfig
from pagedllm.kernels.triton.kv_write import write_kv
from pagedllm.kernels.triton.paged_attention import paged_attention

# Small tiles so the cases below span several query tiles and several KV tiles per program.
CONFIG = LaunchConfig(block_m=16, block_n=16)
KV_CONFIG = LaunchConfig(block_m=2)
BLOCK_SIZE = 4
NUM_BLOCKS = 24


def make_batch(query_lens, seq_lens, device, pad_tokens_to=None, seed=0):  # type: ignore[no-untyped-def]
    """Scattered (shuffled) block tables so a wrong table lookup cannot pass by accident."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables, used = [], 0
    for s in seq_lens:
        n = -(-s // BLOCK_SIZE)
        tables.append(perm[used : used + n])
        used += n
    return AttentionBatch.build(query_lens, seq_lens, tables, BLOCK_SIZE, device=device, pad_tokens_to=pad_tokens_to)


def run_both(spec, batch, device, seed=0):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    t, d = batch.num_tokens, spec.head_size
    q = torch.randn(t, spec.num_heads, d, generator=gen).to(device)
    k = torch.randn(t, spec.num_kv_heads, d, generator=gen).to(device)
    v = torch.randn(t, spec.num_kv_heads, d, generator=gen).to(device)
    ref = ReferenceAttentionBackend(spec)
    kv_ref = torch.randn(ref.kv_cache_shape(NUM_BLOCKS, BLOCK_SIZE, spec.num_kv_heads, d), generator=gen).to(device)
    kv = kv_ref.clone()
    expected = ref.forward(q, k, v, kv_ref, batch)
    write_kv(k, v, kv[0], kv[1], batch.slot_mapping, KV_CONFIG)
    out = paged_attention(
        q, kv[0], kv[1], batch.block_tables, batch.query_start_loc, batch.seq_lens,
        max_query_len=batch.max_query_len, scale=spec.scale, config=CONFIG,
        sliding_window=spec.sliding_window, soft_cap=spec.logit_soft_cap,
    )
    return out, expected, kv, kv_ref


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,window,soft_cap",
    [(4, 2, None, None), (4, 1, 5, None), (6, 2, None, 5.0), (3, 3, 7, 30.0)],
    ids=["gqa", "mqa-window", "gqa3-softcap", "mha-window-softcap"],
)
def test_mixed_batch_matches_reference(device, num_heads, num_kv_heads, window, soft_cap) -> None:
    # prefill (20 tokens: 3 query tiles for group 2), chunked prefill over 9 cached tokens,
    # decode over 22 cached tokens, an empty slot, and two padding tokens at the end.
    spec = AttentionSpec(num_heads, num_kv_heads, 16, 0.25, torch.float32, BLOCK_SIZE, window, soft_cap)
    batch = make_batch([20, 6, 1, 0], [20, 15, 23, 5], device, pad_tokens_to=29)
    out, expected, kv, kv_ref = run_both(spec, batch, device)
    torch.testing.assert_close(kv, kv_ref, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_decode_batch_reads_every_kv_block(device) -> None:
    # Sequence lengths that end exactly on, just past and just before block/tile boundaries.
    spec = AttentionSpec(4, 2, 8, 0.3, torch.float32, BLOCK_SIZE)
    batch = make_batch([1, 1, 1], [16, 17, 31], device, seed=1)
    out, expected, _, _ = run_both(spec, batch, device, seed=1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_padding_tokens_get_zeros_and_are_not_written(device) -> None:
    spec = AttentionSpec(2, 1, 8, 0.3, torch.float32, BLOCK_SIZE)
    batch = make_batch([3, 0], [3, 4], device, pad_tokens_to=6, seed=2)
    out, _, kv, kv_ref = run_both(spec, batch, device, seed=2)
    assert torch.equal(out[3:], torch.zeros_like(out[3:]))
    torch.testing.assert_close(kv, kv_ref, rtol=0, atol=0)  # only the 3 real tokens changed the cache


def test_kv_write_takes_strided_key_value_views(device) -> None:
    # Keys/values sliced out of a fused qkv projection are strided per token.
    qkv = torch.randn(5, 3 * 2 * 8, device=device).view(5, 6, 8)
    key, value = qkv[:, 2:4], qkv[:, 4:6]
    cache = torch.zeros(2, 3, BLOCK_SIZE, 2, 8, device=device)
    slots = torch.tensor([11, 0, -1, 5, 6], device=device)
    write_kv(key, value, cache[0], cache[1], slots, KV_CONFIG)
    flat = cache.view(2, 3 * BLOCK_SIZE, 2, 8)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat[0, s], key[t]) and torch.equal(flat[1, s], value[t])
    assert int((flat.abs().sum(dim=(2, 3)) > 0).sum()) == 2 * 4  # four written slots, nothing else


def test_mismatched_cache_head_size_is_a_clear_error(device) -> None:
    q = torch.zeros(1, 2, 8, device=device)
    cache = torch.zeros(2, 2, BLOCK_SIZE, 1, 16, device=device)
    batch = make_batch([1], [1], device)
    with pytest.raises(ValueError, match="head size 8"):
        paged_attention(q, cache[0], cache[1], batch.block_tables, batch.query_start_loc, batch.seq_lens,
                        max_query_len=1, scale=1.0, config=CONFIG)
