"""Batches the fused-path tests run, and the check they share with the planted-bug tests.

Each case is a mixed batch description: per sequence (query length, sequence length, its blocks),
shuffled block ids so block tables matter, GQA (8 query heads over 2 KV heads) and pre-filled
context in the cache so chunked prefills read keys written by earlier steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_npu_standin
from pagedllm.plugin import AttentionBatch, AttentionSpec, ReferenceAttentionBackend

HEADS, KV_HEADS, HEAD_SIZE, BLOCK_SIZE, NUM_BLOCKS = 8, 2, 64, 16, 12


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    pad_tokens_to: int | None = None


CASES = [
    Case("prefill", [19, 5], [19, 5], [[7, 2], [4]]),
    Case("chunked_prefill", [6, 17], [40, 30], [[3, 9, 0], [11, 5]]),
    Case("decode", [1, 1, 1], [33, 1, 16], [[8, 1, 10], [6], [2]]),
    # A decode, a chunked prefill, an empty slot (q_len 0) and two padding tokens at the end.
    Case("mixed_with_padding", [1, 9, 0], [21, 25, 0], [[4, 0], [9, 1], [3]], pad_tokens_to=12),
]


def spec(dtype: torch.dtype) -> AttentionSpec:
    return AttentionSpec(HEADS, KV_HEADS, HEAD_SIZE, HEAD_SIZE**-0.5, dtype, block_size=BLOCK_SIZE)


def run_against_reference(backend_class: type, case: Case, dtype: torch.dtype, seed: int = 0) -> None:
    """The fused backend on the stand-in ops must match the core's reference backend: output and cache."""
    torch.manual_seed(seed)
    s = spec(dtype)
    backend, ref = backend_class(s, npu=torch_npu_standin), ReferenceAttentionBackend(s)
    batch = AttentionBatch.build(case.query_lens, case.seq_lens, case.block_tables, BLOCK_SIZE,
                                 pad_tokens_to=case.pad_tokens_to)
    tokens = batch.num_tokens
    q = torch.randn(tokens, HEADS, HEAD_SIZE).to(dtype)
    k, v = torch.randn(tokens, KV_HEADS, HEAD_SIZE).to(dtype), torch.randn(tokens, KV_HEADS, HEAD_SIZE).to(dtype)
    kv, kv_ref = backend.allocate_kv_cache(NUM_BLOCKS, "cpu"), ref.allocate_kv_cache(NUM_BLOCKS, "cpu")
    kv.copy_(torch.randn(kv.shape).to(dtype))  # earlier steps' keys/values (the context)
    kv_ref.copy_(kv)
    out = backend.forward(q, k, v, kv, backend.build_metadata(batch))
    expected = ref.forward(q, k, v, kv_ref, ref.build_metadata(batch))
    torch.testing.assert_close(kv, kv_ref, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
