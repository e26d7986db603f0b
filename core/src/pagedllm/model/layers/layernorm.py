"""RMSNorm over the last dimension through the ops registry (plain, fused with the residual add, Gemma's 1+w)."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.model.layers.weight_utils import check_shape
from pagedllm.ops import OPS


class RMSNorm(nn.Module):
    """y = x / rms(x) * w. ``weight_offset=1`` gives Gemma's ``(1 + w)``, folded into the weight at load."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, weight_offset: float = 0.0) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight_offset = weight_offset
        # Gemma computes 1 + w in fp32; keeping the folded weight fp32 preserves that precision.
        dtype = torch.float32 if weight_offset else None
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        check_shape(loaded, (self.hidden_size,))
        param.data.copy_(loaded.float() + self.weight_offset if self.weight_offset else loaded)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual)."""
        if residual is None:
            return OPS.rms_norm(x, self.weight, self.eps)
        return OPS.fused_add_rms_norm(x, residual, self.weight, self.eps)
