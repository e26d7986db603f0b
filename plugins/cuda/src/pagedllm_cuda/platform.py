"""The CUDA platform, and its Triton-interpreter twin that runs the same kernels on CPU."""

from __future__ import annotations

from typing import Any

from pagedllm.kernels.triton.platform import TritonInterpreterMode, TritonPlatform

from pagedllm_cuda.attention import CudaAttentionBackend
from pagedllm_cuda.communicator import NcclCommunicator


class CudaPlatform(TritonPlatform):
    name = "cuda"
    verified_on = "NVIDIA GPU (CUDA)"
    attention_backend_class = CudaAttentionBackend
    bf16_requirement = "compute capability 8.0 or newer (Ampere+)"
    communicator_class = NcclCommunicator

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["launch"] = "NVIDIA configs (32-lane warps)"
        return info


class CudaInterpreterPlatform(TritonInterpreterMode, CudaPlatform):
    """PAGEDLLM_TRITON_INTERPRET=1: the CUDA backend's kernels and launch configs, run on CPU."""
