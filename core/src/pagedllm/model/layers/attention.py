"""The Attention layer: reshapes projections to heads and hands them to the platform's attention backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from pagedllm.attention.backend import AttentionBackend, AttentionSpec
from pagedllm.errors import ConfigError
from pagedllm.model.forward_context import get_forward_context

if TYPE_CHECKING:
    from pagedllm.platforms.platform import Platform


class Attention(nn.Module):
    """One attention layer; per step it reads metadata and its KV cache from the forward context."""

    def __init__(self, spec: AttentionSpec, platform: Platform, layer_idx: int) -> None:
        super().__init__()
        self.spec = spec
        self.layer_idx = layer_idx
        self.backend: AttentionBackend = platform.attention_backend(spec)
        if spec.cache_dtype != spec.dtype and not self.backend.supports_kv_cache_dtype(spec.cache_dtype):
            cache, model = (str(d).removeprefix("torch.") for d in (spec.cache_dtype, spec.dtype))
            raise ConfigError(
                f"kv_cache_dtype {cache}: the {self.backend.name} attention backend keeps a {model} model's KV "
                f"cache only in {model} (use --kv-cache-dtype auto)",
                param="kv_cache_dtype",
            )

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads * head_size]
        k: torch.Tensor,  # [T, num_kv_heads * head_size]
        v: torch.Tensor,  # [T, num_kv_heads * head_size]
    ) -> torch.Tensor:  # [T, num_heads * head_size]
        s = self.spec
        ctx = get_forward_context()
        out = self.backend.forward(
            q.reshape(-1, s.num_heads, s.head_size),
            k.reshape(-1, s.num_kv_heads, s.head_size),
            v.reshape(-1, s.num_kv_heads, s.head_size),
            ctx.kv_caches[self.layer_idx],
            ctx.attn_metadata,
        )
        return out.reshape(-1, s.num_heads * s.head_size)
