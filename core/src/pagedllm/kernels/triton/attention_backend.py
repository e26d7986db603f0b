"""TritonAttentionBackend: the paged attention backend over the Triton kernels, configured per vendor.

KV layout: ``[2, num_blocks, block_size, num_kv_heads, head_size]`` (keys, then values), the
layout the kv_write and paged_attention kernels address through strides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from pagedllm.attention.backend import AttentionBackend, AttentionBatch, AttentionSpec
from pagedllm.kernels.triton.kv_write import write_kv
from pagedllm.kernels.triton.launch import LaunchConfig
from pagedllm.kernels.triton.paged_attention import paged_attention


@dataclass(frozen=True, slots=True)
class AttentionLaunchConfigs:
    """A vendor's launch configurations for the attention path."""

    prefill: LaunchConfig  # steps with any query longer than one token
    decode: LaunchConfig  # steps where every sequence has at most one query token
    kv_write: LaunchConfig  # block_m = KV heads per program


class TritonAttentionBackend(AttentionBackend):
    """Writes new keys/values by slot mapping, then runs paged attention; both are Triton kernels."""

    name = "triton"
    launch_configs: AttentionLaunchConfigs  # set by each vendor's subclass
    # The kernels it launches; a vendor may swap in its own (same signatures) and keep the rest.
    write_kv_kernel: ClassVar[Callable[..., None]] = staticmethod(write_kv)
    attention_kernel: ClassVar[Callable[..., torch.Tensor]] = staticmethod(paged_attention)

    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__(spec)
        if not hasattr(self, "launch_configs"):
            raise TypeError(f"{type(self).__name__} must define launch_configs")

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int
    ) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def build_metadata(self, batch: AttentionBatch) -> AttentionBatch:
        if batch.block_size != self.spec.block_size:
            raise ValueError(f"batch block_size {batch.block_size} != layer block_size {self.spec.block_size}")
        return batch

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
        metadata: AttentionBatch,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
        spec = self.spec
        configs = self.launch_configs
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        self.write_kv_kernel(key, value, key_cache, value_cache, metadata.slot_mapping, configs.kv_write)
        config = configs.decode if metadata.max_query_len <= 1 else configs.prefill
        return self.attention_kernel(
            query,
            key_cache,
            value_cache,
            metadata.block_tables,
            metadata.query_start_loc,
            metadata.seq_lens,
            max_query_len=metadata.max_query_len,
            scale=spec.scale,
            config=config,
            sliding_window=spec.sliding_window,
            soft_cap=spec.logit_soft_cap,
        )

    def read_kv(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, num_blocks, block_size, heads, head_size = kv_cache.shape
        flat = kv_cache.view(2, num_blocks * block_size, heads, head_size)
        return flat[0, slots], flat[1, slots]

    def copy_blocks(self, kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
        if src_to_dst.numel() == 0:
            return
        pairs = src_to_dst.to(device=kv_caches[0].device, dtype=torch.long)
        src, dst = pairs[:, 0], pairs[:, 1]
        for kv_cache in kv_caches:
            # One gather + scatter per layer; reads all sources before writing any destination.
            kv_cache[:, dst] = kv_cache[:, src]
