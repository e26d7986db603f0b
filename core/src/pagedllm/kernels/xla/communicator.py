"""Collectives as XLA ops (torch_xla.core.xla_model): traced into the step's graph, run by the device's ICI/fabric."""

from __future__ import annotations

import torch
import torch_xla.core.xla_model as xm

from pagedllm.distributed.communicator import Communicator


class XlaCommunicator(Communicator):
    """all_reduce / all_gather / reduce_scatter through xm's collectives; the rest as the core's default."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        return xm.all_reduce(xm.REDUCE_SUM, tensor)

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        return xm.all_gather(tensor, dim=dim % tensor.dim())

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        dim = dim % tensor.dim()
        if tensor.shape[dim] % self.world_size != 0:
            raise ValueError(f"dim {dim} of size {tensor.shape[dim]} not divisible by {self.world_size}")
        return xm.reduce_scatter(xm.REDUCE_SUM, tensor, 1.0, dim, self.world_size)
