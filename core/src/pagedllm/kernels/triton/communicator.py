"""Collectives for NCCL/RCCL process groups through torch.distributed's single-buffer operations.

NCCL and RCCL gather into and reduce-scatter out of one contiguous tensor natively; the core's
default Communicator goes through lists of tensors, which costs extra copies on a GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pagedllm.distributed.communicator import Communicator

# torch 2.13 renamed the single-buffer collectives; older torch (>= 2.4) has only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class TensorCollectiveCommunicator(Communicator):
    """all_gather / reduce_scatter on one flat buffer along dim 0, moved to the requested dim."""

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        dim = dim % tensor.dim()
        moved = tensor.movedim(dim, 0).contiguous()  # [d, ...]
        out = torch.empty((self.world_size * moved.shape[0], *moved.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        _all_gather_single(out, moved, group=self.group)
        return out.movedim(0, dim)

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        dim = dim % tensor.dim()
        if tensor.shape[dim] % self.world_size != 0:
            raise ValueError(f"dim {dim} of size {tensor.shape[dim]} not divisible by {self.world_size}")
        moved = tensor.movedim(dim, 0).contiguous()  # [world * d, ...]
        out = torch.empty((moved.shape[0] // self.world_size, *moved.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        _reduce_scatter_single(out, moved, group=self.group)
        return out.movedim(0, dim)
