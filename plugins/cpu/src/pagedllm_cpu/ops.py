"""CPU op overrides: ``packed_linear`` on GGUF blocks for decode-sized batches.

Measured on the 2-core Xeon (torch 2.13, fp32): the core's torch-native rms_norm / rotary /
silu_and_mul were not beaten by any candidate (``F.rms_norm`` is bit-identical and within noise;
torch.compile of one attention function took 85 s here and ran slower), so they stay native.

``packed_linear`` multiplies GGUF Q4_0 / Q4_1 / Q8_0 blocks directly (kernels/gguf_linear.c) when
a step has at most ``PACKED_MAX_ROWS`` token rows: decoding is bound by memory traffic, and the
blocks are 5-8.5 bits per weight instead of 32. Larger batches are compute-bound, where MKL's dense
sgemm on the dense fp32 weight is faster, so they use it. Both give the same fp32 values up to
summation order (the kernel dequantizes to exactly the loader's fp32 weights).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from pagedllm.plugin import PackedWeight, PluginRegistry

from pagedllm_cpu.kernels import gguf

logger = logging.getLogger(__name__)

# Token rows up to which the packed kernel beats dense MKL sgemm. Measured per layer on the 2-core
# Xeon, SmolLM2 shapes, weights streamed from memory: m=1 ~2.5x faster, m=4 ~2x, m=16 about even,
# m=64 ~0.5x.
PACKED_MAX_ROWS = 8


def packed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedWeight | None
) -> torch.Tensor:
    """x weight^T + bias, from the GGUF blocks when that is the faster way here, else dense."""
    if (
        packed is None
        or x.dim() != 2
        or x.shape[0] > PACKED_MAX_ROWS
        or x.dtype != torch.float32
        or x.device.type != "cpu"
        or packed.ggml_type not in gguf.TYPE_SIZES
    ):
        return F.linear(x, weight, bias)
    y = gguf.load().linear(x.contiguous(), packed.ggml_type, packed.data, packed.out_features)
    return y.add_(bias) if bias is not None else y


def _supports(ggml_type: int, dtype: torch.dtype) -> bool:
    """Keep a layer's blocks only when the kernels are built and would run on them (fp32 models)."""
    if dtype != torch.float32 or ggml_type not in gguf.TYPE_SIZES:
        return False
    kernels, why = gguf.status()
    if kernels is None:
        if gguf.wanted() == "1":
            raise gguf.KernelUnavailable(f"{gguf.KERNELS_ENV}=1 but the GGUF kernels are {why}")
        logger.info("GGUF blocks not kept: the CPU kernels are %s", why)
    return kernels is not None


packed_linear.supports = _supports  # type: ignore[attr-defined]


def register_ops(registry: PluginRegistry) -> None:
    """Register the CPU overrides (see the module docstring for what and why)."""
    registry.override_op("packed_linear", packed_linear, owner="cpu")
