"""RCCL collectives for tensor parallelism on AMD GPUs (torch's "nccl" backend is RCCL on ROCm)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from pagedllm.kernels.triton.communicator import TensorCollectiveCommunicator


class RcclCommunicator(TensorCollectiveCommunicator):
    """Single-buffer collectives; refuses a group of another backend rather than running slowly on it."""

    def __init__(self, group: Any = None) -> None:
        super().__init__(group)
        if dist.is_initialized() and dist.get_backend(group) != "nccl":
            raise RuntimeError(
                f"the ROCm platform needs an RCCL process group (torch backend 'nccl'), got "
                f"{dist.get_backend(group)!r}; initialise torch.distributed with backend='nccl'"
            )
