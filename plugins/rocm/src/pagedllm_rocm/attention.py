"""The ROCm attention backend: the shared Triton paged attention with AMD CDNA launch configurations."""

from __future__ import annotations

from pagedllm.kernels.triton import LaunchConfig
from pagedllm.kernels.triton.attention_backend import AttentionLaunchConfigs, TritonAttentionBackend

# num_warps counts 64-lane wavefronts on AMD, so 4 wavefronts span 256 lanes (twice NVIDIA's 4
# warps); narrower key tiles keep the larger register footprint per wave within the VGPR
# budget, and num_stages=1 because Triton's AMD pipeliner gains little on this loop.
# Defaults chosen from the kernel's shape, not tuned on hardware (no GPU was available).
ROCM_ATTENTION = AttentionLaunchConfigs(
    prefill=LaunchConfig(block_m=64, block_n=32, num_warps=4, num_stages=1),
    decode=LaunchConfig(block_m=16, block_n=32, num_warps=2, num_stages=1),
    kv_write=LaunchConfig(block_m=8, block_n=32, num_warps=2, num_stages=1),
)


class RocmAttentionBackend(TritonAttentionBackend):
    name = "rocm-triton"
    launch_configs = ROCM_ATTENTION
