"""The ROCm platform, and its Triton-interpreter twin that runs the same kernels on CPU."""

from __future__ import annotations

from typing import Any

from pagedllm.kernels.triton.platform import TritonInterpreterMode, TritonPlatform

from pagedllm_rocm.attention import RocmAttentionBackend
from pagedllm_rocm.communicator import RcclCommunicator


class RocmPlatform(TritonPlatform):
    name = "rocm"
    verified_on = "AMD GPU (ROCm/HIP)"
    attention_backend_class = RocmAttentionBackend
    bf16_requirement = "an MI200-class GPU (gfx90a) or newer"
    communicator_class = RcclCommunicator

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["launch"] = "AMD CDNA configs (64-lane wavefronts)"
        return info


class RocmInterpreterPlatform(TritonInterpreterMode, RocmPlatform):
    """PAGEDLLM_TRITON_INTERPRET=1: the ROCm backend's kernels and launch configs, run on CPU."""
