"""Ascend launch configurations for the core's portable Triton kernels (the Triton path).

On Ascend each Triton program runs on one AI core (its vector unit, plus the cube unit for
``tl.dot``); there are no warps: triton-ascend's default SIMD mode ignores ``num_warps`` (it is
passed only in its SIMT mode), and its compiler double-buffers loads itself (``multibuffer``), so
``num_stages`` stays 1. Tiles are sized for the 192 KB unified buffer of a 910B vector core
(fp32 q/k/v/score tiles of 64 x 128 fit twice over) and keep ``tl.dot`` operands multiples of the
cube unit's 16 x 16 fractals. Chosen from the hardware's shape, not tuned on an NPU (none was
available).
"""

from __future__ import annotations

from pagedllm.kernels.triton import LaunchConfig
from pagedllm.kernels.triton.attention_backend import AttentionLaunchConfigs

ASCEND_ATTENTION = AttentionLaunchConfigs(
    prefill=LaunchConfig(block_m=64, block_n=64, num_warps=1, num_stages=1),
    decode=LaunchConfig(block_m=16, block_n=128, num_warps=1, num_stages=1),
    # Few, wide programs: a program per (token, 16 KV heads) rather than per head.
    kv_write=LaunchConfig(block_m=16, block_n=32, num_warps=1, num_stages=1),
)
NORM = LaunchConfig(num_warps=1)  # whole rows per program
ROTARY = LaunchConfig(num_warps=1)
ACTIVATION = LaunchConfig(block_n=2048, num_warps=1)  # 8 KB of fp32 per operand per program
