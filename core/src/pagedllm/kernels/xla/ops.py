"""Op overrides the XLA backends register (torch-xla lowers some native formulations wrongly).

``apply_token_bitmask``: the native op extracts bit k of each int32 word with ``word >> k``, but
torch-xla 2.9 lowers a right shift by a tensor of amounts wrongly for negative words (bits above
the lowest come out inverted; measured on XLA:CPU), so structured outputs would allow the wrong
tokens. Here each bit is tested against a constant mask built on the host (no shifts on device).
"""

from __future__ import annotations

import math

import torch

from pagedllm.plugin_registry import PluginRegistry

OWNER = "pagedllm xla (kernels/xla/ops.py)"

# 1 << k for k in 0..31 as int32 (bit 31 wraps to -2**31): built on the host, once.
_BITS = (torch.ones(32, dtype=torch.int64) << torch.arange(32)).to(torch.int32)


def apply_token_bitmask(
    logits: torch.Tensor,  # [N, V] float, masked in place
    bitmask: torch.Tensor,  # [M, W] int32: bit t % 32 of word t // 32 set = token t allowed
    indices: torch.Tensor,  # [M] int64: the row of logits each bitmask row constrains
) -> torch.Tensor:
    """As the native op: disallowed tokens of rows ``indices`` set to -inf in place; others unchanged."""
    if bitmask.shape[0] == 0:
        return logits
    n = min(logits.shape[-1], bitmask.shape[-1] * 32)
    bits = _BITS.to(bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) & bits) != 0).flatten(1)[:, :n]  # [M, 32 W] -> [M, n]
    rows = logits.index_select(0, indices)  # [M, V]
    rows[:, :n].masked_fill_(~allowed, -math.inf)
    logits.index_copy_(0, indices, rows)
    return logits


def register_ops(registry: PluginRegistry) -> None:
    registry.override_op("apply_token_bitmask", apply_token_bitmask, OWNER)
