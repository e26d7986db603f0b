"""Torch-native defaults of every named op: the reference each override is tested against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pagedllm.ops.packed import PackedWeight, dequantize, dequantize_rows


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [num_tokens, hidden]. Computed in fp32, returned in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); the sum is the next residual."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] = cat(cos, sin), fp32
    is_neox_style: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first rotary_dim features of query and key; returns new tensors."""
    rotary_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [num_tokens, rotary_dim / 2]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
        if is_neox_style:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return torch.cat((out.to(x.dtype), rest), dim=-1)

    return rotate(query), rotate(key)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * d] -> silu(x[..., :d]) * x[..., d:]."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * d] -> gelu_tanh(x[..., :d]) * x[..., d:] (Gemma's MLP)."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def packed_linear(
    x: torch.Tensor,  # [num_tokens, in_features]
    weight: torch.Tensor,  # [out_features, in_features]: the exact dequantization of packed
    bias: torch.Tensor | None,
    packed: PackedWeight | None,
) -> torch.Tensor:
    """y = x weight^T + bias. The native op ignores ``packed``: ``weight`` holds the same values. (The
    loader keeps only the blocks, with a meta ``weight``, where ``supports`` says so: never for this
    op; should one reach it anyway, the blocks are dequantized for the call rather than computing on meta.)"""
    if weight.is_meta and packed is not None:
        weight = dequantize(packed).to(device=x.device, dtype=x.dtype)
    return F.linear(x, weight, bias)


def _packed_supports(ggml_type: int, dtype: torch.dtype) -> bool:
    """Whether this implementation would use a PackedWeight of ``ggml_type`` at ``dtype``: never."""
    return False


packed_linear.supports = _packed_supports  # type: ignore[attr-defined]


def packed_linear_silu_and_mul(
    x: torch.Tensor,  # [num_tokens, in_features]
    weight: torch.Tensor,  # [2 d, in_features]: a gated MLP's gate rows, then its up rows
    bias: torch.Tensor | None,
    packed: PackedWeight | None,
) -> torch.Tensor:
    """silu(x gate^T) * (x up^T), [num_tokens, d]: the registry's ``silu_and_mul`` of its ``packed_linear``
    (so a platform's overrides of those two apply). A platform may override it to fuse the two, e.g. not
    writing the [num_tokens, 2 d] projection out."""
    from pagedllm.ops import OPS  # the registry imports this module

    return OPS.silu_and_mul(OPS.packed_linear(x, weight, bias, packed))


def packed_embedding(ids: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """Rows ``ids`` ([T] int64) of a block matrix, dequantized: fp32 [T, in_features] (only those rows)."""
    rows = packed.data.index_select(0, ids.to(packed.data.device))  # [T, bytes per row]
    return dequantize_rows(rows, packed.ggml_type, packed.in_features).to(ids.device)


def apply_token_bitmask(
    logits: torch.Tensor,  # [N, V] float, masked in place
    bitmask: torch.Tensor,  # [M, W] int32: bit t % 32 of word t // 32 set = token t allowed
    indices: torch.Tensor,  # [M] int64: the row of logits each bitmask row constrains
) -> torch.Tensor:
    """Set the disallowed tokens of rows ``indices`` to -inf, in place, and return ``logits``; other rows
    and tokens past 32 W stay as they are."""
    if bitmask.shape[0] == 0:
        return logits
    n = min(logits.shape[-1], bitmask.shape[-1] * 32)
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    # An arithmetic shift of a negative word still leaves the wanted bit lowest.
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :n]  # [M, 32 W] -> [M, n]
    rows = logits.index_select(0, indices)  # [M, V]
    rows[:, :n].masked_fill_(~allowed, -math.inf)
    logits.index_copy_(0, indices, rows)
    return logits


NATIVE_OPS = {
    "rms_norm": rms_norm,
    "fused_add_rms_norm": fused_add_rms_norm,
    "rotary_embedding": rotary_embedding,
    "silu_and_mul": silu_and_mul,
    "gelu_tanh_and_mul": gelu_tanh_and_mul,
    "packed_linear": packed_linear,
    "packed_linear_silu_and_mul": packed_linear_silu_and_mul,
    "packed_embedding": packed_embedding,
    "apply_token_bitmask": apply_token_bitmask,
}
