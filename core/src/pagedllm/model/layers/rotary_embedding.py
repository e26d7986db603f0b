"""Rotary position embedding: a cos/sin cache built once per model (default, linear, llama3, yarn scalings)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagedllm.ops import OPS

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:  # [dim / 2]
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(base: float, dim: int, params: dict[str, Any]) -> torch.Tensor:
    inv_freq = _base_inv_freq(base, dim)
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by factor, short ones kept, the band between interpolated.
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def _yarn_inv_freq(
    base: float, dim: int, params: dict[str, Any], max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    factor = params.get("factor")
    original = params["original_max_position_embeddings"]
    if factor is None:
        factor = max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        if params.get("mscale") and params.get("mscale_all_dim"):
            attention_factor = mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


def rope_inv_freq(
    rope_parameters: dict[str, Any], rotary_dim: int, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim / 2] fp32, attention scaling of cos/sin), as HF's ROPE_INIT_FUNCTIONS compute them."""
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default")) or "default"
    base = float(rope_parameters.get("rope_theta", 10000.0))
    if rope_type == "default":
        return _base_inv_freq(base, rotary_dim), 1.0
    if rope_type == "linear":
        return _base_inv_freq(base, rotary_dim) / rope_parameters["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(base, rotary_dim, rope_parameters), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(base, rotary_dim, rope_parameters, max_position_embeddings)
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


class RotaryEmbedding(nn.Module):
    """Holds cos_sin_cache [max_position, rotary_dim] fp32 and applies it through ``OPS.rotary_embedding``."""

    def __init__(
        self,
        head_size: int,
        rotary_dim: int,
        max_position: int,
        rope_parameters: dict[str, Any],
        max_position_embeddings: int,
        is_neox_style: bool = True,
        freq_factors: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.is_neox_style = is_neox_style
        device = torch.empty(0).device  # the loader's build device
        with torch.device("cpu"):  # the same fp32 math on every platform, then moved
            inv_freq, attention_factor = rope_inv_freq(rope_parameters, rotary_dim, max_position_embeddings)
            if (
                freq_factors is not None
            ):  # llama.cpp's rope_freqs tensor: per-frequency divisors (Llama 3 GGUFs)
                inv_freq = inv_freq / freq_factors.float().cpu()
            freqs = torch.outer(
                torch.arange(max_position, dtype=torch.float32), inv_freq
            )  # [max_pos, rotary_dim / 2]
            cache = torch.cat((freqs.cos() * attention_factor, freqs.sin() * attention_factor), dim=-1)
        self.register_buffer("cos_sin_cache", cache.to(device), persistent=False)

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        query: torch.Tensor,  # [T, num_heads, head_size]
        key: torch.Tensor,  # [T, num_kv_heads, head_size]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return OPS.rotary_embedding(positions, query, key, self.cos_sin_cache, self.is_neox_style)
