"""apply_token_bitmask: structured outputs' mask of disallowed tokens, written as -inf into the logits."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels.triton.launch import LaunchConfig


@triton.jit
def token_bitmask_kernel(
    logits_ptr,  # [N, V] float, masked in place
    bitmask_ptr,  # [M, W] int32
    indices_ptr,  # [M] int64
    stride_logits, stride_bitmask,
    n,  # min(V, 32 W): tokens the bitmask covers
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_range = cols < n
    row = tl.load(indices_ptr + i).to(tl.int64)
    words = tl.load(bitmask_ptr + i * stride_bitmask + cols // 32, mask=in_range, other=-1)
    allowed = ((words >> (cols % 32)) & 1) != 0
    tl.store(logits_ptr + row * stride_logits + cols, float("-inf"), mask=in_range & ~allowed)


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, indices: torch.Tensor, *, config: LaunchConfig
) -> torch.Tensor:
    """logits [N, V] (last dim contiguous), bitmask [M, W] int32, indices [M] int64; masks in place and
    returns logits. One program per (constrained row, token tile)."""
    m = bitmask.shape[0]
    if m == 0:
        return logits
    if logits.stride(-1) != 1:
        raise ValueError("apply_token_bitmask needs logits whose last dimension is contiguous")
    bitmask = bitmask.contiguous()
    indices = indices.to(torch.int64).contiguous()
    n = min(logits.shape[-1], bitmask.shape[-1] * 32)
    block = min(config.block_n, triton.next_power_of_2(n))
    token_bitmask_kernel[(m, triton.cdiv(n, block))](
        logits, bitmask, indices, logits.stride(0), bitmask.stride(0), n,
        BLOCK=block,
        **config.launch_kwargs(),
    )
    return logits
