"""StructuredStep: one step's token bitmask for its constrained sampling rows, sent from the engine to the runner."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.ops import OPS


@dataclass(slots=True)
class StructuredStep:
    """``bitmask[i]`` constrains the step's sampling row ``rows[i]``; other rows are left alone.

    Sampling rows are numbered as the model runner lays them out: each scheduled sequence that
    samples, followed by the n > 1 siblings forked from it this step.
    """

    bitmask: torch.Tensor  # [M, ceil(V / 32)] int32, on the host
    rows: torch.Tensor  # [M] int64, on the host

    def apply(self, logits: torch.Tensor) -> None:
        """Mask disallowed tokens of the constrained rows of ``logits`` [N, V] to -inf, in place."""
        dev = logits.device
        OPS.apply_token_bitmask(
            logits, self.bitmask.to(dev, non_blocking=True), self.rows.to(dev, non_blocking=True)
        )
