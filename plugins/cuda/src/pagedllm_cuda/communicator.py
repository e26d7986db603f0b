"""NCCL collectives for tensor parallelism on NVIDIA GPUs."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from pagedllm.kernels.triton.communicator import TensorCollectiveCommunicator


class NcclCommunicator(TensorCollectiveCommunicator):
    """Single-buffer collectives; refuses a group of another backend rather than running slowly on it."""

    def __init__(self, group: Any = None) -> None:
        super().__init__(group)
        if dist.is_initialized() and dist.get_backend(group) != "nccl":
            raise RuntimeError(
                f"the CUDA platform needs an NCCL process group, got {dist.get_backend(group)!r}; "
                "initialise torch.distributed with backend='nccl'"
            )
