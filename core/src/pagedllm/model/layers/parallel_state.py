"""Tensor-parallel state: this process's rank, the group size and the communicator layers reduce through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(slots=True)
class TensorParallelGroup:
    """Where this process sits in the tensor-parallel group; size 1 never touches torch.distributed."""

    rank: int = 0
    size: int = 1
    communicator: Any = None  # a pagedllm Communicator; required only when size > 1

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is not in [0, {self.size})")

    def _comm(self) -> Any:
        if self.communicator is None:
            raise RuntimeError(
                f"tensor parallelism over {self.size} ranks needs a communicator; none was set"
            )
        return self.communicator

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.size == 1 else self._comm().all_reduce(x)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return x if self.size == 1 else self._comm().all_gather(x, dim=dim)


_TP = TensorParallelGroup()


def get_tp_group() -> TensorParallelGroup:
    """The group layers built without an explicit one use."""
    return _TP


def set_tp_group(group: TensorParallelGroup) -> None:
    """Set by the loader before building a model (each worker process has its own)."""
    global _TP
    _TP = group


def resolve_tp(
    tp_rank: int | None, tp_size: int | None, tp_group: TensorParallelGroup | None
) -> TensorParallelGroup:
    """An explicit group wins; explicit rank/size build a group sharing the current communicator."""
    if tp_group is not None:
        return tp_group
    current = get_tp_group()
    if tp_rank is None and tp_size is None:
        return current
    size = tp_size if tp_size is not None else current.size
    rank = tp_rank if tp_rank is not None else (current.rank if size == current.size else 0)
    return TensorParallelGroup(rank, size, current.communicator if size > 1 else None)
