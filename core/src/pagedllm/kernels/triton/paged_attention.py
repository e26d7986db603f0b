"""Paged attention over block tables for a flattened mixed batch (prefill, chunked prefill, decode).

One program computes one tile of query tokens of one sequence for one KV head. Its rows are
(query token, query head of that KV head's group) pairs, so the keys and values it streams
through the block table are read once for the whole GQA/MQA group. Scores go through an online
softmax, one KV tile at a time, so nothing of size seq_len is ever materialised. Decode is the
``q_len == 1`` case of the same kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels.triton.launch import LaunchConfig


@triton.jit
def _tanh(x):
    # tanh through exp (portable across Triton versions and backends); saturates cleanly to +-1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_size]
    q_ptr,  # [num_tokens, num_heads, head_size]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    stride_q_tok, stride_q_head,
    stride_o_tok, stride_o_head,
    stride_kv_block, stride_kv_slot, stride_kv_head,
    stride_bt_seq,
    scale,
    soft_cap,
    window,
    head_size,
    block_size,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # rows per program, >= BLOCK_Q * GROUP
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_D: tl.constexpr,  # head_size rounded up to a power of two
    USE_SOFT_CAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    tile_start = q_tile * BLOCK_Q
    if tile_start >= q_len:  # empty slot, or a tile past this sequence's queries
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # tokens already in the cache before this step's queries

    rows = tl.arange(0, BLOCK_M)
    q_idx = tile_start + rows // GROUP  # query token within the sequence's queries
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = context_len + q_idx  # absolute position of each row's query token

    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_size
    q_tok = (q_start + q_idx).to(tl.int64)
    q_ptrs = q_ptr + q_tok[:, None] * stride_q_tok + head[:, None] * stride_q_head + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)

    # Keys this tile can see: causal bounds the end, the sliding window bounds the start.
    last_pos = context_len + tl.minimum(tile_start + BLOCK_Q, q_len) - 1
    kv_end = last_pos + 1
    kv_begin = 0
    if USE_WINDOW:
        kv_begin = tl.maximum(context_len + tile_start - window + 1, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq

    for kv_tile in range(kv_begin, kv_end, BLOCK_N):
        k_pos = kv_tile + tl.arange(0, BLOCK_N)  # absolute key positions
        k_valid = k_pos < kv_end
        physical = tl.load(table + k_pos // block_size, mask=k_valid, other=0).to(tl.int64)
        kv_off = physical * stride_kv_block + (k_pos % block_size) * stride_kv_slot + kv_head * stride_kv_head
        kv_mask = k_valid[:, None] & d_valid[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N]
        if USE_SOFT_CAP:
            s = soft_cap * _tanh(s / soft_cap)
        visible = k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
        s = tl.where(visible, s, float("-inf"))

        # Online softmax; a row that has seen no visible key yet keeps m = -inf, so use 0 as
        # its shift to avoid (-inf) - (-inf).
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = out_ptr + q_tok[:, None] * stride_o_tok + head[:, None] * stride_o_head + offs_d[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    max_query_len: int,
    scale: float,
    config: LaunchConfig,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    out: torch.Tensor | None = None,
    dot_precision: str | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
    """Causal attention of each sequence's queries over its cached keys/values (already written).

    Tokens outside every sequence's query range (padding) get zeros. ``config.block_m`` is the
    number of (query token, head) rows per program and ``config.block_n`` the keys per step.
    ``dot_precision`` (tl.dot's input_precision) defaults to "ieee" for fp32 and to the compiler's
    default otherwise; triton-ascend has no such default, so the Ascend backend passes "ieee".
    """
    num_tokens, num_heads, head_size = query.shape
    num_blocks, block_size, num_kv_heads, kv_head_size = key_cache.shape
    if kv_head_size != head_size or value_cache.shape != key_cache.shape:
        raise ValueError(
            f"KV cache {tuple(key_cache.shape)}/{tuple(value_cache.shape)} does not match query head size {head_size}"
        )
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if query.stride(-1) != 1 or key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("query and KV cache must be contiguous in the head dimension")
    if key_cache.stride() != value_cache.stride():
        raise ValueError("key and value caches must share one layout")
    if config.block_m < 16 or config.block_n < 16:
        raise ValueError(f"paged attention needs block_m, block_n >= 16 (tl.dot's minimum), got {config}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if out is None:
        out = torch.zeros_like(query)
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or max_query_len == 0:
        return out

    group = num_heads // num_kv_heads
    # A program holds BLOCK_Q query tokens times the whole group of query heads in its rows.
    block_m = max(config.block_m, _next_pow2(group))
    block_q = block_m // group
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    paged_attention_kernel[grid](
        out, query, key_cache, value_cache, block_tables, query_start_loc, seq_lens,
        query.stride(0), query.stride(1),
        out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0),
        scale,
        soft_cap if soft_cap is not None else 1.0,
        sliding_window if sliding_window is not None else 0,
        head_size,
        block_size,
        GROUP=group,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=config.block_n,
        BLOCK_D=max(16, _next_pow2(head_size)),
        USE_SOFT_CAP=soft_cap is not None,
        USE_WINDOW=sliding_window is not None,
        # fp32 runs are compared against an fp32 oracle: keep TF32 out of the dot products.
        DOT_PRECISION=dot_precision or ("ieee" if query.dtype == torch.float32 else None),
        **config.launch_kwargs(),
    )
    return out
