"""RMSNorm, plain and fused with the residual add, one program per token row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels.triton.launch import LaunchConfig


@triton.jit
def rms_norm_kernel(
    out_ptr,  # [num_tokens, hidden]
    x_ptr,  # [num_tokens, hidden]
    residual_ptr,  # [num_tokens, hidden], read only when HAS_RESIDUAL
    residual_out_ptr,  # [num_tokens, hidden]: x + residual, written only when HAS_RESIDUAL
    weight_ptr,  # [hidden]
    stride_out, stride_x, stride_res, stride_res_out,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # hidden rounded up to a power of two: the whole row in registers
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(residual_ptr + row * stride_res + cols, mask=mask, other=0.0)
        tl.store(residual_out_ptr + row * stride_res_out + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (xf * inv_rms * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm weight has {weight.shape[0]} features, input has {x.shape[-1]}")
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch(x2, weight, eps, config, residual2=None):  # type: ignore[no-untyped-def]
    out = torch.empty_like(x2)
    residual_out = torch.empty_like(x2) if residual2 is not None else out
    num_tokens, hidden = x2.shape
    if num_tokens > 0:
        res = residual2 if residual2 is not None else x2
        rms_norm_kernel[(num_tokens,)](
            out, x2, res, residual_out, weight,
            out.stride(0), x2.stride(0), res.stride(0), residual_out.stride(0),
            hidden,
            eps,
            HAS_RESIDUAL=residual2 is not None,
            BLOCK=triton.next_power_of_2(hidden),
            **config.launch_kwargs(),
        )
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, config: LaunchConfig) -> torch.Tensor:
    """x: [..., hidden] -> x / rms(x) * weight, computed in fp32, returned in x's dtype."""
    out, _ = _launch(_rows(x, weight), weight, eps, config)
    return out.view(x.shape)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, config: LaunchConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual) from one pass over the row."""
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} does not match input {tuple(x.shape)}")
    out, summed = _launch(_rows(x, weight), weight, eps, config, _rows(residual, weight))
    return out.view(x.shape), summed.view(x.shape)
