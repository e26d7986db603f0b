"""HCCL collectives for tensor parallelism on Ascend NPUs."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from pagedllm.plugin import Communicator, PlatformError


class HcclCommunicator(Communicator):
    """The core's torch.distributed collectives on an HCCL group; refuses a group of another backend.

    HCCL implements all of them (reduce_scatter included), so nothing is overridden; the single
    buffer variants of pagedllm.kernels.triton.communicator are not used because the fused path
    must work without triton installed.
    """

    def __init__(self, group: Any = None) -> None:
        super().__init__(group)
        if dist.is_initialized() and dist.get_backend(group) != "hccl":
            raise PlatformError(
                f"the Ascend platform needs an HCCL process group, got {dist.get_backend(group)!r}; "
                "initialise torch.distributed with backend='hccl' (torch_npu registers it)"
            )
