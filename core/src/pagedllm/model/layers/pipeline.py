"""Pipeline-parallel stage: which decoder layers this rank holds, and the activations it passes on.

Stage s of p holds a contiguous run of layers (as even as they go). A stage other than the first
receives (hidden, residual) from the stage before it; a stage other than the last sends them on
without waiting (isend), so it can start the next micro-batch while the next stage computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def stage_layers(num_layers: int, rank: int, size: int) -> tuple[int, int]:
    """[start, end) of the layers stage ``rank`` of ``size`` holds."""
    if num_layers < size:
        raise ValueError(f"{num_layers} layers cannot fill {size} pipeline stages")
    base, extra = divmod(num_layers, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class MissingLayer(nn.Identity):
    """Stands where a layer held by another pipeline stage would be (no parameters, never called)."""


@dataclass(slots=True)
class PipelineStage:
    rank: int = 0
    size: int = 1
    communicator: Any = None  # a pagedllm Communicator over the world; required when size > 1
    prev_rank: int = -1  # global ranks of the neighbouring stages
    next_rank: int = -1
    recv_wait_s: float = 0.0  # time spent waiting for the previous stage (the bubble, seen from here)
    _pending: list[Any] = field(default_factory=list)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def layers(self, num_layers: int) -> tuple[int, int]:
        return stage_layers(num_layers, self.rank, self.size)

    def send(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        for t in (hidden.contiguous(), residual.contiguous()):
            self._pending.append((self.communicator.isend(t, self.next_rank), t))

    def recv(self, like: torch.Tensor, hidden_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        import time

        shape = (like.shape[0], hidden_size)
        t0 = time.perf_counter()
        hidden = self.communicator.recv(torch.empty(shape, dtype=dtype, device=like.device), self.prev_rank)
        residual = self.communicator.recv(torch.empty(shape, dtype=dtype, device=like.device), self.prev_rank)
        self.recv_wait_s += time.perf_counter() - t0
        return hidden, residual

    def wait_sends(self) -> None:
        """Every send of this step has left (their tensors may be reused)."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()


_PP = PipelineStage()


def get_pp_stage() -> PipelineStage:
    return _PP


def set_pp_stage(stage: PipelineStage) -> None:
    global _PP
    _PP = stage
