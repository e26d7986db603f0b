"""TritonAttentionBackend: layout, block copies and the choice of launch configuration per step."""

from __future__ import annotations

import torch

from pagedllm.attention.backend import AttentionBatch, AttentionSpec
from pagedllm.attention.reference import ReferenceAttentionBackend
from pagedllm.kernels.triton import LaunchConfig
from pagedllm.kernels.triton.attention_backend import AttentionLaunchConfigs, TritonAttentionBackend


class SmallTiles(TritonAttentionBackend):
    name = "test-triton"
    launch_configs = AttentionLaunchConfigs(
        prefill=LaunchConfig(block_m=32, block_n=16),
        decode=LaunchConfig(block_m=16, block_n=32),
        kv_write=LaunchConfig(block_m=1),
    )


SPEC = AttentionSpec(4, 2, 8, 0.35, torch.float32, block_size=4)


def test_prefill_then_decode_step_matches_reference(device) -> None:
    backend, ref = SmallTiles(SPEC), ReferenceAttentionBackend(SPEC)
    kv, kv_ref = backend.allocate_kv_cache(6, device), ref.allocate_kv_cache(6, device)
    assert kv.shape == (2, 6, 4, 2, 8)
    tables = [[4, 1, 3], [0, 5]]
    for query_lens, seq_lens in (([9, 5], [9, 5]), ([1, 1], [10, 6])):
        batch = AttentionBatch.build(query_lens, seq_lens, tables, 4, device=device)
        n = batch.num_tokens
        q, k, v = torch.randn(n, 4, 8, device=device), torch.randn(n, 2, 8, device=device), torch.randn(n, 2, 8, device=device)
        out = backend.forward(q, k, v, kv, backend.build_metadata(batch))
        torch.testing.assert_close(out, ref.forward(q, k, v, kv_ref, batch), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv, kv_ref, rtol=0, atol=0)
    slots = torch.tensor([17, 3, 21], device=device)
    for got, want in zip(backend.read_kv(kv, slots), ref.read_kv(kv_ref, slots), strict=True):
        assert torch.equal(got, want)


def test_copy_blocks_copies_whole_blocks_in_every_layer(device) -> None:
    backend = SmallTiles(SPEC)
    layers = [torch.randn(2, 5, 4, 2, 8, device=device) for _ in range(2)]
    before = [layer.clone() for layer in layers]
    backend.copy_blocks(layers, torch.tensor([[0, 3], [2, 4]]))
    for layer, old in zip(layers, before, strict=True):
        assert torch.equal(layer[:, 3], old[:, 0]) and torch.equal(layer[:, 4], old[:, 2])
        assert torch.equal(layer[:, :3], old[:, :3])
