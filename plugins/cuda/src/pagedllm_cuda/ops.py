"""CUDA op overrides: the shared Triton kernels with NVIDIA launch configurations."""

from __future__ import annotations

from functools import partial

from pagedllm.plugin import PluginRegistry

OWNER = "pagedllm-cuda (triton)"


def register_ops(registry: PluginRegistry) -> None:
    from pagedllm.kernels.triton import LaunchConfig, activation, rms_norm, rotary, token_bitmask

    # Whole-row norms: 8 warps (256 lanes) cover hidden sizes up to 8192 in a few passes.
    norm = LaunchConfig(num_warps=8)
    rope = LaunchConfig(num_warps=4)
    act = LaunchConfig(block_n=1024, num_warps=4)
    registry.override_op("rms_norm", partial(rms_norm.rms_norm, config=norm), OWNER)
    registry.override_op("fused_add_rms_norm", partial(rms_norm.fused_add_rms_norm, config=norm), OWNER)
    registry.override_op("rotary_embedding", partial(rotary.rotary_embedding, config=rope), OWNER)
    registry.override_op("silu_and_mul", partial(activation.silu_and_mul, config=act), OWNER)
    registry.override_op("gelu_tanh_and_mul", partial(activation.gelu_tanh_and_mul, config=act), OWNER)
    # Structured outputs: one program per (constrained row, 1024-token tile).
    mask = LaunchConfig(block_n=1024, num_warps=4)
    registry.override_op("apply_token_bitmask", partial(token_bitmask.apply_token_bitmask, config=mask), OWNER)
