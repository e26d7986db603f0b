"""A stand-in for the torch_npu ops pagedllm-ascend calls, for tests only: executable definitions on CPU tensors.

Written from the ops' documented semantics (torch_npu / op-plugin docs), not from their code, so
the fused attention path's layouts, argument order, GQA head counts, block tables and sequence
lengths are checked without an NPU. It is as strict as the documentation: arguments the docs
forbid raise, and anything pagedllm does not use raises NotImplementedError rather than being
guessed. It proves nothing about the real kernels' numerics or speed.
"""

from __future__ import annotations

import math

import torch

ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
MASK_SIZE = 2048
_INT_MAX = 2147483647


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"torch_npu stand-in: {message}")


# --- KV cache writes ---------------------------------------------------------------------------
def npu_scatter_pa_kv_cache(key, value, key_cache, value_cache, slot_mapping, *, compress_lens=None,
                            compress_seq_offsets=None, seq_lens=None, cache_mode="Norm") -> None:
    """cache_mode "Norm": key/value [T, N, D] into caches [num_blocks, block_size, N, D] at flat slots, in place."""
    if compress_lens is not None or compress_seq_offsets is not None or seq_lens is not None or cache_mode != "Norm":
        raise NotImplementedError("stand-in covers cache_mode='Norm' without compression only")
    _require(key.dim() == 3 and value.shape[:2] == key.shape[:2], f"key {tuple(key.shape)} / value {tuple(value.shape)} must be [T, N, D]")
    _require(key.is_contiguous() and value.is_contiguous(), "key and value must be contiguous")
    _require(key_cache.is_contiguous() and value_cache.is_contiguous(), "caches must be contiguous")
    _require(key_cache.dim() == 4 and key_cache.shape[2:] == key.shape[1:],
             f"key_cache {tuple(key_cache.shape)} is not [num_blocks, block_size, {key.shape[1]}, {key.shape[2]}]")
    _require(value_cache.dim() == 4 and value_cache.shape[2:] == value.shape[1:],
             f"value_cache {tuple(value_cache.shape)} does not hold value rows {tuple(value.shape[1:])}")
    _require(slot_mapping.dtype in (torch.int32, torch.int64) and slot_mapping.shape == (key.shape[0],),
             f"slot_mapping must be int32/int64 [{key.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    num_slots = key_cache.shape[0] * key_cache.shape[1]
    slots = slot_mapping.long()
    _require(bool(((slots >= 0) & (slots < num_slots)).all()), f"slot out of range [0, {num_slots})")
    key_cache.view(num_slots, *key_cache.shape[2:])[slots] = key.to(key_cache.dtype)
    value_cache.view(num_slots, *value_cache.shape[2:])[slots] = value.to(value_cache.dtype)


# --- attention ---------------------------------------------------------------------------------
def _paged_kv(cache: torch.Tensor, table_row: torch.Tensor, kv_len: int, block_size: int, kv_heads: int,
              head_dim: int) -> torch.Tensor:
    """[kv_len, kv_heads, head_dim] from a paged cache: (blocks, block_size, H) or (blocks, KV_N, block_size, D)."""
    needed = math.ceil(kv_len / block_size)
    _require(table_row.shape[0] >= needed, f"block_table row has {table_row.shape[0]} blocks, {needed} needed")
    blocks = cache[table_row[:needed].long()]
    if cache.dim() == 3:  # BnBsH
        _require(cache.shape[1] == block_size, f"cache block size {cache.shape[1]} != block_size {block_size}")
        _require(cache.shape[2] == kv_heads * head_dim,
                 f"paged cache H={cache.shape[2]} != num_key_value_heads {kv_heads} x D {head_dim}")
        rows = blocks.reshape(-1, kv_heads, head_dim)
    elif cache.dim() == 4:  # BnNBsD
        _require(cache.shape[1:] == (kv_heads, block_size, head_dim),
                 f"paged cache {tuple(cache.shape)} is not (blocks, {kv_heads}, {block_size}, {head_dim})")
        rows = blocks.permute(0, 2, 1, 3).reshape(-1, kv_heads, head_dim)
    else:
        raise ValueError(f"torch_npu stand-in: paged key/value must be 3-D or 4-D, got {tuple(cache.shape)}")
    return rows[:kv_len]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, visible: torch.Tensor) -> torch.Tensor:
    """q [q_len, N, D], k/v [kv_len, KV_N, D], visible [q_len, kv_len] -> [q_len, N, D] (fp32 softmax)."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)  # query head h reads KV head h // group
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows -> zeros
    return torch.einsum("hqk,khd->qhd", probs, v)


def _visible(q_len: int, kv_len: int, sparse_mode: int, atten_mask, pre_tokens: int, next_tokens: int) -> torch.Tensor:
    q_pos = torch.arange(q_len)[:, None]
    k_pos = torch.arange(kv_len)[None, :]
    if sparse_mode == 0 and atten_mask is None:
        return torch.ones(q_len, kv_len, dtype=torch.bool)
    if sparse_mode in (2, 3):
        _require(atten_mask is not None and atten_mask.dtype == torch.bool and atten_mask.shape == (MASK_SIZE, MASK_SIZE),
                 f"sparse_mode {sparse_mode} needs the optimised {MASK_SIZE} x {MASK_SIZE} bool mask")
        expected = torch.triu(torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool, device=atten_mask.device), diagonal=1)
        _require(bool(torch.equal(atten_mask, expected)), "the optimised causal mask must be triu(ones, diagonal=1)")
        if sparse_mode == 2:  # leftUpCausal
            return k_pos <= q_pos
        _require(q_len <= kv_len, f"rightDownCausal needs q_len {q_len} <= kv_len {kv_len}")
        return k_pos <= q_pos + (kv_len - q_len)  # rightDownCausal: queries are the last q_len tokens
    raise NotImplementedError(f"stand-in covers sparse_mode 0 without mask, 2 and 3; got {sparse_mode}")


def _split_query(query: torch.Tensor, layout: str, num_heads: int, actual_seq_lengths) -> list[torch.Tensor]:
    """Per-batch queries [q_len, N, D] as the documented layout reads ``query``."""
    if layout == "TND":
        _require(query.dim() == 3, f"TND query must be 3-D, got {tuple(query.shape)}")
        _require(query.shape[1] == num_heads, f"TND query has {query.shape[1]} heads, num_heads is {num_heads}")
        _require(actual_seq_lengths is not None, "TND needs actual_seq_lengths (cumulative query ends)")
        ends = list(actual_seq_lengths)
        _require(all(b >= a for a, b in zip([0, *ends], ends, strict=False)) and (not ends or ends[-1] <= query.shape[0]),
                 f"actual_seq_lengths {ends} must be non-decreasing cumulative ends within {query.shape[0]} tokens")
        return [query[a:b] for a, b in zip([0, *ends], ends, strict=False)]
    if layout == "BSH":
        _require(query.dim() == 3 and query.shape[2] % num_heads == 0, f"BSH query {tuple(query.shape)} with {num_heads} heads")
        batches = query.reshape(query.shape[0], query.shape[1], num_heads, -1)
    elif layout == "BSND":
        _require(query.dim() == 4 and query.shape[2] == num_heads, f"BSND query {tuple(query.shape)} with {num_heads} heads")
        batches = query
    elif layout == "BNSD":
        _require(query.dim() == 4 and query.shape[1] == num_heads, f"BNSD query {tuple(query.shape)} with {num_heads} heads")
        batches = query.transpose(1, 2)
    else:
        raise NotImplementedError(f"stand-in covers TND, BSH, BSND, BNSD; got {layout!r}")
    batch, seq = batches.shape[0], batches.shape[1]
    lens = list(actual_seq_lengths) if actual_seq_lengths is not None else [seq]
    # Documented: one length applies to every batch; otherwise at least B lengths, the first B used.
    lens = lens * batch if len(lens) == 1 else lens
    _require(len(lens) >= batch and all(0 <= n <= seq for n in lens[:batch]),
             f"actual_seq_lengths {lens} for {batch} batches of {seq} query tokens")
    return [batches[b, : lens[b]] for b in range(batches.shape[0])]


def npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
                                    actual_seq_lengths_kv=None, block_table=None, num_heads=1, scale=1.0,
                                    pre_tokens=_INT_MAX, next_tokens=_INT_MAX, input_layout="BSH",
                                    num_key_value_heads=0, sparse_mode=0, inner_precise=0, block_size=0,
                                    softmax_lse_flag=False, **unsupported):
    """softmax(scale * q k^T + mask) v; here only the paged (block_table) form pagedllm uses, TND-shaped output for TND."""
    if pse_shift is not None or softmax_lse_flag or any(v is not None for v in unsupported.values()):
        raise NotImplementedError(f"stand-in does not cover {sorted(k for k, v in unsupported.items() if v is not None)}")
    _require(query.dtype in ATTENTION_DTYPES, f"query dtype {query.dtype} (float16/bfloat16 only)")
    _require(key.dtype == query.dtype and value.shape == key.shape, "key/value must match each other and the query dtype")
    kv_heads = num_key_value_heads or num_heads
    _require(num_heads % kv_heads == 0 and num_heads // kv_heads <= 64,
             f"num_heads {num_heads} must be a multiple of num_key_value_heads {kv_heads} (ratio <= 64)")
    if block_table is None:
        raise NotImplementedError("stand-in covers the page attention form (block_table given) only")
    _require(block_table.dtype == torch.int32 and block_table.dim() == 2, "block_table must be 2-D int32")
    _require(block_size > 0, "page attention needs block_size")
    _require(actual_seq_lengths_kv is not None, "page attention needs actual_seq_lengths_kv")
    queries = _split_query(query, input_layout, num_heads, actual_seq_lengths)
    head_dim = query.shape[-1] if input_layout != "BSH" else query.shape[-1] // num_heads
    kv_lens = list(actual_seq_lengths_kv)
    _require(len(kv_lens) == len(queries) == block_table.shape[0],
             f"{len(queries)} batches, {len(kv_lens)} KV lengths, {block_table.shape[0]} block table rows")
    outputs = []
    for b, q in enumerate(queries):
        k = _paged_kv(key, block_table[b], kv_lens[b], block_size, kv_heads, head_dim)
        v = _paged_kv(value, block_table[b], kv_lens[b], block_size, kv_heads, head_dim)
        visible = _visible(q.shape[0], kv_lens[b], sparse_mode, atten_mask, pre_tokens, next_tokens)
        outputs.append(_attend(q, k, v, scale, visible).to(query.dtype))
    if input_layout == "TND":
        out = torch.zeros_like(query)
        done = sum(o.shape[0] for o in outputs)
        out[:done] = torch.cat(outputs) if outputs else out[:0]
    else:
        raise NotImplementedError("stand-in returns TND-shaped outputs only")
    return out, torch.zeros(1, dtype=torch.float32)


def _npu_paged_attention(*, query, key_cache, value_cache, num_kv_heads, num_heads, scale_value, block_table,
                         context_lens, out, workspace=None) -> None:
    """Decode: query [B, N, D], one token per sequence, over caches [num_blocks, block_size, KV_N, D]; writes ``out``."""
    _require(query.dtype in ATTENTION_DTYPES, f"query dtype {query.dtype} (float16/bfloat16 only)")
    _require(query.dim() == 3 and query.shape[1] == num_heads, f"query {tuple(query.shape)} is not [B, {num_heads}, D]")
    _require(key_cache.dim() == 4 and key_cache.shape[2:] == (num_kv_heads, query.shape[2]),
             f"key_cache {tuple(key_cache.shape)} is not [num_blocks, block_size, {num_kv_heads}, {query.shape[2]}]")
    _require(value_cache.shape == key_cache.shape, "value_cache must match key_cache")
    _require(num_heads % num_kv_heads == 0, f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
    _require(block_table.dtype == torch.int32 and block_table.shape[0] == query.shape[0], "block_table must be int32 [B, M]")
    _require(context_lens.dtype == torch.int32 and context_lens.device.type == "cpu" and context_lens.shape == (query.shape[0],),
             "context_lens must be a host int32 tensor [B]")
    _require(out.shape == query.shape, f"out {tuple(out.shape)} must match query {tuple(query.shape)}")
    block_size = key_cache.shape[1]
    cache_k = key_cache.view(key_cache.shape[0], block_size, -1)
    cache_v = value_cache.view(value_cache.shape[0], block_size, -1)
    for b in range(query.shape[0]):
        kv_len = int(context_lens[b])
        k = _paged_kv(cache_k, block_table[b], kv_len, block_size, num_kv_heads, query.shape[2])
        v = _paged_kv(cache_v, block_table[b], kv_len, block_size, num_kv_heads, query.shape[2])
        visible = torch.ones(1, kv_len, dtype=torch.bool)
        out[b] = _attend(query[b : b + 1], k, v, scale_value, visible)[0].to(out.dtype)


# --- fused elementwise ops ---------------------------------------------------------------------
def npu_rms_norm(x, gamma, epsilon=1e-6):
    """(x / sqrt(mean(x^2, -1) + epsilon) * gamma, rstd), computed in fp32."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-6):
    """(rms_norm(x1 + x2), rstd, x1 + x2)."""
    summed = x1 + x2
    y, rstd = npu_rms_norm(summed, gamma, epsilon)
    return y, rstd, summed


def npu_rotary_mul(x, r1, r2):
    """x * r1 + rotate_half(x) * r2, rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]); x is 4-D, r1/r2 broadcast to it."""
    _require(x.dim() == 4, f"x must be 4-D (BSND/BNSD/SBND), got {tuple(x.shape)}")
    _require(r1.dim() == 4 and r1.shape == r2.shape and r1.shape[-1] == x.shape[-1], "r1/r2 must be 4-D with x's last dim")
    _require(torch.broadcast_shapes(x.shape, r1.shape) == x.shape, f"r1 {tuple(r1.shape)} does not broadcast to x {tuple(x.shape)}")
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * r1.float() + rotated.float() * r2.float()).to(x.dtype)


def npu_swiglu(x, dim=-1):
    """Split x in two along dim: silu(first half) * second half."""
    _require(x.shape[dim] % 2 == 0, f"dim {dim} of {tuple(x.shape)} must be even")
    a, b = x.chunk(2, dim=dim)
    return (torch.nn.functional.silu(a.float()) * b.float()).to(x.dtype)
