"""The CUDA attention backend: the shared Triton paged attention with NVIDIA launch configurations."""

from __future__ import annotations

from pagedllm.kernels.triton import LaunchConfig
from pagedllm.kernels.triton.attention_backend import AttentionLaunchConfigs, TritonAttentionBackend

# 32-lane warps. Prefill tiles of 64 (query token, head) rows x 64 keys keep the two dot
# products on tensor cores; decode rows are few (one token x the GQA group), so a 16-row tile.
# Defaults chosen from the kernel's shape, not tuned on hardware (no GPU was available).
CUDA_ATTENTION = AttentionLaunchConfigs(
    prefill=LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
    decode=LaunchConfig(block_m=16, block_n=64, num_warps=4, num_stages=2),
    kv_write=LaunchConfig(block_m=8, block_n=32, num_warps=4, num_stages=1),
)


class CudaAttentionBackend(TritonAttentionBackend):
    name = "cuda-triton"
    launch_configs = CUDA_ATTENTION
