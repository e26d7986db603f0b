"""Ascend op overrides: torch_npu's fused kernels on the fused path, the shared Triton kernels on the Triton path.

Fused path (``npu_rms_norm``, ``npu_add_rms_norm``, ``npu_rotary_mul``, ``npu_swiglu``): each
override adapts the core op's contract (see ``pagedllm.plugin.native_ops``) to the torch_npu op's
documented one. GPT-J-style (interleaved) rotary and the gelu-tanh gate have no torch_npu op used
here and keep the core's defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

import torch
from pagedllm.kernels.interpret import interpreter_requested
from pagedllm.plugin import PluginRegistry, native_ops

from pagedllm_ascend.settings import attention_path

FUSED_OWNER = "pagedllm-ascend (torch_npu)"
TRITON_OWNER = "pagedllm-ascend (triton)"


def rms_norm(npu: ModuleType, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return npu.npu_rms_norm(x, weight, epsilon=eps)[0]  # (y, rstd)


def fused_add_rms_norm(
    npu: ModuleType, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, summed = npu.npu_add_rms_norm(x, residual, weight, epsilon=eps)  # (y, rstd, x + residual)
    return y, summed


def rotary_embedding(
    npu: ModuleType,
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] = cat(cos, sin), fp32
    is_neox_style: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX rotary through npu_rotary_mul: x * cos + rotate_half(x) * sin on the first rotary_dim features."""
    if not is_neox_style:
        return native_ops.rotary_embedding(positions, query, key, cos_sin_cache, is_neox_style)
    rotary_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [num_tokens, rotary_dim / 2]
    # npu_rotary_mul takes BSND input with [1, S, 1, D] factors covering both halves.
    cos = torch.cat((cos, cos), dim=-1)[None, :, None, :]
    sin = torch.cat((sin, sin), dim=-1)[None, :, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rot = x[..., :rotary_dim].unsqueeze(0).contiguous()  # [1, num_tokens, heads, rotary_dim]
        out = npu.npu_rotary_mul(rot, cos.to(x.dtype), sin.to(x.dtype)).squeeze(0)
        return torch.cat((out, x[..., rotary_dim:]), dim=-1)

    return rotate(query), rotate(key)


def silu_and_mul(npu: ModuleType, x: torch.Tensor) -> torch.Tensor:
    return npu.npu_swiglu(x, dim=-1)  # silu(first half) * second half


def register_fused_ops(registry: PluginRegistry, npu: ModuleType) -> None:
    """torch_npu's fused kernels as op overrides (``npu``: torch_npu, or a test's stand-in of it)."""
    registry.override_op("rms_norm", partial(rms_norm, npu), FUSED_OWNER)
    registry.override_op("fused_add_rms_norm", partial(fused_add_rms_norm, npu), FUSED_OWNER)
    registry.override_op("rotary_embedding", partial(rotary_embedding, npu), FUSED_OWNER)
    registry.override_op("silu_and_mul", partial(silu_and_mul, npu), FUSED_OWNER)


def triton_ops() -> dict[str, Callable[..., Any]]:
    """The Triton path's op overrides: the shared kernels with Ascend launch configurations."""
    from pagedllm.kernels.triton import activation, rotary
    from pagedllm.kernels.triton import rms_norm as triton_rms_norm

    from pagedllm_ascend.kernels.launch_configs import ACTIVATION, NORM, ROTARY

    return {
        "rms_norm": partial(triton_rms_norm.rms_norm, config=NORM),
        "fused_add_rms_norm": partial(triton_rms_norm.fused_add_rms_norm, config=NORM),
        "rotary_embedding": partial(rotary.rotary_embedding, config=ROTARY),
        "silu_and_mul": partial(activation.silu_and_mul, config=ACTIVATION),
        "gelu_tanh_and_mul": partial(activation.gelu_tanh_and_mul, config=ACTIVATION),
    }


def register_triton_ops(registry: PluginRegistry) -> None:
    for name, fn in triton_ops().items():
        registry.override_op(name, fn, TRITON_OWNER)


def register_ops(registry: PluginRegistry) -> None:
    """The overrides of the selected mode: interpreter twin and Triton path, or the fused path."""
    if interpreter_requested() or attention_path() == "triton":
        register_triton_ops(registry)
        return
    from pagedllm_ascend.npu import import_torch_npu

    register_fused_ops(registry, import_torch_npu())
