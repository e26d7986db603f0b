"""Rotary position embedding of queries and keys (NeoX and GPT-J layouts), one program per token."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels.triton.launch import LaunchConfig


@triton.jit
def _rotate_heads(
    ptr, token, stride_tok, stride_head, num_heads, cos, sin, half,
    IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # Rotates pairs (x1, x2) in place: NeoX pairs feature i with i + half, GPT-J pairs 2i with 2i + 1.
    heads = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    if IS_NEOX:
        idx1 = offs
        idx2 = offs + half
    else:
        idx1 = 2 * offs
        idx2 = 2 * offs + 1
    mask = (heads < num_heads)[:, None] & (offs < half)[None, :]
    base = ptr + token * stride_tok + heads[:, None] * stride_head
    x1 = tl.load(base + idx1[None, :], mask=mask, other=0.0)
    x2 = tl.load(base + idx2[None, :], mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(base + idx1[None, :], (x1f * cos[None, :] - x2f * sin[None, :]).to(x1.dtype), mask=mask)
    tl.store(base + idx2[None, :], (x2f * cos[None, :] + x1f * sin[None, :]).to(x2.dtype), mask=mask)


@triton.jit
def rotary_kernel(
    positions_ptr,  # [num_tokens] int64
    q_ptr,  # [num_tokens, num_heads, head_size], rotated in place
    k_ptr,  # [num_tokens, num_kv_heads, head_size], rotated in place
    cos_sin_ptr,  # [max_position, rotary_dim] = cat(cos, sin), fp32
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cs,
    num_heads,
    num_kv_heads,
    half,  # rotary_dim // 2
    IS_NEOX: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token)
    offs = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs, mask=offs < half, other=1.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + half + offs, mask=offs < half, other=0.0)
    _rotate_heads(q_ptr, token, stride_q_tok, stride_q_head, num_heads, cos, sin, half, IS_NEOX, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, token, stride_k_tok, stride_k_head, num_kv_heads, cos, sin, half, IS_NEOX, BLOCK_HK, BLOCK_HALF)


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] fp32
    is_neox_style: bool = True,
    *,
    config: LaunchConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first rotary_dim features of query and key; returns new tensors."""
    rotary_dim = cos_sin_cache.shape[-1]
    head_size = query.shape[-1]
    if rotary_dim % 2 or rotary_dim > head_size or key.shape[-1] != head_size:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and <= head_size {head_size}")
    if positions.shape[0] != query.shape[0] or key.shape[0] != query.shape[0]:
        raise ValueError("positions, query and key must have one entry per token")
    q, k = query.contiguous().clone(), key.contiguous().clone()
    cos_sin = cos_sin_cache.contiguous()
    num_tokens = q.shape[0]
    if num_tokens > 0:
        rotary_kernel[(num_tokens,)](
            positions, q, k, cos_sin,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
            q.shape[1],
            k.shape[1],
            rotary_dim // 2,
            IS_NEOX=is_neox_style,
            BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
            BLOCK_HK=triton.next_power_of_2(k.shape[1]),
            BLOCK_HALF=triton.next_power_of_2(rotary_dim // 2),
            **config.launch_kwargs(),
        )
    return q, k
