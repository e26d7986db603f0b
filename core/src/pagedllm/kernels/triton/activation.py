"""Gated activations of the MLP: silu(gate) * up and gelu_tanh(gate) * up over [..., 2 * d] inputs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels.triton.launch import LaunchConfig

SILU = 0
GELU_TANH = 1


@triton.jit
def act_and_mul_kernel(
    out_ptr,  # [num_tokens, d]
    x_ptr,  # [num_tokens, 2 * d] = cat(gate, up)
    stride_out, stride_x,
    d,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == 0:
        act = gate / (1.0 + tl.exp(-gate))
    else:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)  # sqrt(2/pi) * (...)
        act = 0.5 * gate * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))  # 1 + tanh(inner), via exp
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def _act_and_mul(x: torch.Tensor, activation: int, config: LaunchConfig) -> torch.Tensor:
    if x.shape[-1] % 2:
        raise ValueError(f"gated activation needs an even last dimension, got {x.shape[-1]}")
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0 and d > 0:
        block = min(config.block_n, triton.next_power_of_2(d))
        act_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            out, x2, out.stride(0), x2.stride(0), d,
            ACTIVATION=activation,
            BLOCK=block,
            **config.launch_kwargs(),
        )
    return out.view(*x.shape[:-1], d)


def silu_and_mul(x: torch.Tensor, *, config: LaunchConfig) -> torch.Tensor:
    """x: [..., 2 * d] -> silu(x[..., :d]) * x[..., d:]; one program per (token, feature tile)."""
    return _act_and_mul(x, SILU, config)


def gelu_tanh_and_mul(x: torch.Tensor, *, config: LaunchConfig) -> torch.Tensor:
    """x: [..., 2 * d] -> gelu_tanh(x[..., :d]) * x[..., d:] (Gemma's MLP)."""
    return _act_and_mul(x, GELU_TANH, config)
