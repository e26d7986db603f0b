"""The reference backend against dense attention written a second, independent way."""

from __future__ import annotations

import pytest
import torch

from pagedllm.plugin import AttentionBatch, AttentionSpec, ReferenceAttentionBackend


def dense(q, k, v, scale, window=None, cap=None):
    """q: [T, H, D], k/v: [T, Hkv, D], one causal sequence via SDPA-style masking."""
    t, h, _ = q.shape
    group = h // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("thd,shd->hts", q, k) * scale
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    mask = j <= i
    if window is not None:
        mask &= (i - j) < window
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hts,shd->thd", s.softmax(-1), v)


@pytest.mark.parametrize("window,cap", [(None, None), (3, None), (None, 5.0)])
@pytest.mark.parametrize("chunks", [[10], [4, 6], [7, 1, 1, 1]])
def test_chunked_paged_attention_equals_dense_attention(chunks, window, cap) -> None:
    torch.manual_seed(0)
    total, heads, kv_heads, d, bs = sum(chunks), 4, 2, 8, 4
    spec = AttentionSpec(heads, kv_heads, d, d**-0.5, torch.float32, bs, window, cap)
    backend = ReferenceAttentionBackend(spec)
    cache = backend.allocate_kv_cache(8, "cpu")
    table = [5, 2, 7]  # non-contiguous blocks
    q, k, v = torch.randn(total, heads, d), torch.randn(total, kv_heads, d), torch.randn(total, kv_heads, d)
    outs, done = [], 0
    for c in chunks:
        batch = AttentionBatch.build([c], [done + c], [table], bs)
        outs.append(backend.forward(q[done : done + c], k[done : done + c], v[done : done + c], cache, batch))
        done += c
    torch.testing.assert_close(torch.cat(outs), dense(q, k, v, spec.scale, window, cap), atol=1e-5, rtol=1e-5)
    slots = AttentionBatch.build([total], [total], [table], bs).slot_mapping
    rk, rv = backend.read_kv(cache, slots)
    assert torch.equal(rk, k) and torch.equal(rv, v)


def test_padding_slots_are_not_written_and_copy_blocks_is_exact() -> None:
    spec = AttentionSpec(2, 1, 4, 0.5, torch.float32, 2)
    backend = ReferenceAttentionBackend(spec)
    cache = backend.allocate_kv_cache(4, "cpu")
    batch = AttentionBatch.build([2], [2], [[1]], 2, pad_tokens_to=3)
    q, k, v = torch.randn(3, 2, 4), torch.randn(3, 1, 4), torch.randn(3, 1, 4)
    backend.forward(q, k, v, cache, batch)
    assert cache[:, [0, 2, 3]].abs().sum() == 0
    backend.copy_blocks([cache], torch.tensor([[1, 3]]))
    assert torch.equal(cache[:, 3], cache[:, 1])
