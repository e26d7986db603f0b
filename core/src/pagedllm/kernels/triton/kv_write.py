"""KV cache write: scatter each token's key and value into its cache slot by the slot mapping."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels.triton.launch import LaunchConfig


@triton.jit
def kv_write_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_size]
    value_ptr,  # [num_tokens, num_kv_heads, head_size]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping_ptr,  # [num_tokens] int64; -1 = padding token, write nothing
    stride_k_tok, stride_k_head,
    stride_v_tok, stride_v_head,
    stride_c_block, stride_c_slot, stride_c_head,
    num_kv_heads,
    head_size,
    block_size,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head_tile = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:
        return
    heads = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (heads < num_kv_heads)[:, None] & (offs_d < head_size)[None, :]

    k = tl.load(key_ptr + token * stride_k_tok + heads[:, None] * stride_k_head + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + token * stride_v_tok + heads[:, None] * stride_v_head + offs_d[None, :], mask=mask)
    block = slot // block_size
    cache_off = block * stride_c_block + (slot % block_size) * stride_c_slot
    dst = cache_off + heads[:, None] * stride_c_head + offs_d[None, :]
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping: torch.Tensor,  # [num_tokens] int64
    config: LaunchConfig,
) -> None:
    """Store key[t]/value[t] at flat slot ``slot_mapping[t]``; one program per (token, head tile).

    ``config.block_m`` is the number of KV heads per program.
    """
    num_tokens, num_kv_heads, head_size = key.shape
    num_blocks, block_size, cache_heads, cache_head_size = key_cache.shape
    if value.shape != key.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ in shape")
    if (cache_heads, cache_head_size) != (num_kv_heads, head_size) or value_cache.shape != key_cache.shape:
        raise ValueError(
            f"KV cache {tuple(key_cache.shape)} does not hold [*, *, {num_kv_heads}, {head_size}] entries"
        )
    if slot_mapping.shape[0] < num_tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {num_tokens} tokens")
    if key.stride(-1) != 1 or value.stride(-1) != 1 or key_cache.stride(-1) != 1:
        raise ValueError("key, value and cache must be contiguous in the head dimension")
    if key_cache.stride() != value_cache.stride():
        raise ValueError("key and value caches must share one layout")
    if num_tokens == 0:
        return
    block_h = min(config.block_m, triton.next_power_of_2(num_kv_heads))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    kv_write_kernel[grid](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        num_kv_heads,
        head_size,
        block_size,
        BLOCK_H=block_h,
        BLOCK_D=triton.next_power_of_2(head_size),
        **config.launch_kwargs(),
    )
