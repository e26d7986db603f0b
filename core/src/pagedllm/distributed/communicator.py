"""The Communicator: collectives over torch.distributed with the platform's backend.

A plugin subclasses it only to replace what its hardware does better.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Communicator:
    """Collectives for one process group. With world size 1 every op is the identity."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum across ranks; returns the reduced tensor (in place where possible)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's tensor along dim."""
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Sum across ranks, then keep this rank's 1/world_size slice along dim."""
        if self.world_size == 1:
            return tensor
        if tensor.shape[dim] % self.world_size != 0:
            raise ValueError(f"dim {dim} of size {tensor.shape[dim]} not divisible by {self.world_size}")
        chunks = [c.contiguous() for c in tensor.chunk(self.world_size, dim=dim)]
        out = torch.empty_like(chunks[self.rank])
        try:
            dist.reduce_scatter(out, chunks, group=self.group)
        except (RuntimeError, ValueError, NotImplementedError):
            # gloo has no reduce_scatter: all_reduce then slice is exact, just slower.
            full = tensor.clone()
            dist.all_reduce(full, group=self.group)
            out = full.chunk(self.world_size, dim=dim)[self.rank].contiguous()
        return out

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size > 1:
            dist.broadcast(tensor, src=src, group=self.group)
        return tensor

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        dist.send(tensor, dst=dst, group=self.group)

    def isend(self, tensor: torch.Tensor, dst: int) -> dist.Work:
        """Start sending; the caller keeps ``tensor`` alive and calls ``wait()`` on the result."""
        return dist.isend(tensor, dst=dst, group=self.group)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        dist.recv(tensor, src=src, group=self.group)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)
