"""CPU op overrides: C kernels (kernels/cpu_ops.c, gguf_linear.c) for fp32 tensors.

rms_norm, fused_add_rms_norm, silu_and_mul and rotary_embedding: at decode sizes each is a few
microseconds of arithmetic, but the torch-native expression is 4-20 dispatched ops (tens of
microseconds); one C call per op removes that, 30 layers a step. Other dtypes, layouts the
kernels do not take, or kernels that could not be built: the core's native op.

``packed_linear`` (the core's linear layers call it for every fp32 matmul) takes one of two kernels:
- GGUF Q4_0 / Q4_1 / Q8_0 blocks multiplied directly (kernels/gguf_linear.c) when a step has at
  most ``packed_max_rows()`` token rows (8 with AVX-512, 1 with AVX2, where dequantizing costs
  more; never with the portable build): decoding is bound by memory traffic, and the blocks are
  5-8.5 bits per weight instead of 32;
- otherwise the dense fp32 weight, re-laid out once into column panels (kernels/fp32_gemm.c, the
  panels made at first use and kept beside the weight, so they cost one more copy of the weights):
  batched steps are compute-bound and this runs them 1.2-3x faster than MKL's sgemm.
Both give the dense weight's fp32 products up to summation order (the block kernel dequantizes to
exactly the loader's fp32 weights). The panel kernel's result for a token row does not depend on
its batch mates.
Steps of 16+ token rows may instead run in bf16 through oneDNN (AMX / AVX-512 BF16), per weight
shape and row-count bucket where measured faster: bf16_matmul.py (switch PAGEDLLM_CPU_BF16_GEMM).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from pagedllm.plugin import PackedWeight, PluginRegistry, native_ops
from torch.utils.weak import WeakIdKeyDictionary

from pagedllm_cpu import bf16_matmul
from pagedllm_cpu.kernels import clib

logger = logging.getLogger(__name__)

# Token rows up to which GGUF blocks are multiplied directly; None: what the built kernels say
# (gguf_linear.c, pagedllm_gguf_max_rows: it depends on the instruction set). Tests set it to
# exercise the block kernel at every batch size.
PACKED_MAX_ROWS: int | None = None


def packed_max_rows(kernels: clib.CpuKernels | None = None) -> int:
    """Token rows up to which a layer's GGUF blocks are multiplied instead of its dense weight."""
    kernels = kernels if kernels is not None else _kernels()
    if kernels is None:
        return 0
    return PACKED_MAX_ROWS if PACKED_MAX_ROWS is not None else kernels.gguf_max_rows


def _kernels() -> clib.CpuKernels | None:
    kernels, _ = clib.status()
    return kernels


# weight -> (its version when packed, its panels). Keyed by identity, held weakly: a weight that is
# freed takes its panels with it; one changed in place (its version moves) is packed again.
_panels: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor keeps no version counter
        return None


def panels_for(kernels: clib.CpuKernels, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in fp32_gemm.c's panel layout, made on first use and kept while the weight lives."""
    entry = _panels.get(weight)
    if entry is None or entry[0] != _version(weight):
        with torch.no_grad():
            entry = (_version(weight), kernels.gemm_pack(weight.detach()))
        _panels[weight] = entry
    return entry[1]


def packed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedWeight | None
) -> torch.Tensor:
    """x weight^T + bias: GGUF blocks for a few rows, else the pre-packed fp32 weight, else torch."""
    if bf16_matmul.routes(x, weight, bias, packed, packed_linear):  # many rows, bf16 measured faster
        return bf16_matmul.linear(x, weight, bias, packed)
    kernels = _kernels()
    if (
        kernels is None
        or x.dim() != 2
        or x.dtype != torch.float32
        or x.device.type != "cpu"
        or x.requires_grad
        or weight.dtype != torch.float32
        or weight.dim() != 2
        or weight.shape[1] != x.shape[1]
        or weight.shape[0] == 0
        or x.shape[1] == 0
        or (bias is not None and (bias.dtype != torch.float32 or bias.shape != (weight.shape[0],)))
    ):
        return F.linear(x, weight, bias)
    if packed is not None and x.shape[0] <= packed_max_rows(kernels) and packed.ggml_type in clib.TYPE_SIZES:
        y = kernels.linear(x.contiguous(), packed.ggml_type, packed.data, packed.out_features)
        return y.add_(bias) if bias is not None else y
    if weight.stride(1) != 1:
        return F.linear(x, weight, bias)
    if x.stride(1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        x = x.contiguous()
    return kernels.gemm(
        x, panels_for(kernels, weight), weight.shape[0], None if bias is None else bias.contiguous()
    )


def _supports(ggml_type: int, dtype: torch.dtype) -> bool:
    """Keep a layer's blocks only when the kernels are built and would run on them (fp32 models)."""
    if dtype != torch.float32 or ggml_type not in clib.TYPE_SIZES:
        return False
    kernels, why = clib.status()
    if kernels is None:
        if clib.wanted() == "1":
            raise clib.KernelUnavailable(f"{clib.KERNELS_ENV}=1 but the GGUF kernels are {why}")
        logger.info("GGUF blocks not kept: the CPU kernels are %s", why)
        return False
    if packed_max_rows(kernels) < 1:
        logger.info("GGUF blocks not kept: this build of the CPU kernels multiplies them slower than fp32")
        return False
    return True


packed_linear.supports = _supports  # type: ignore[attr-defined]


def _rows(x: torch.Tensor) -> bool:
    """A 2-D fp32 CPU tensor whose features are contiguous (rows may be strided)."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2 and x.stride(1) == 1


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    kernels = _kernels()
    if kernels is None or not _rows(x) or weight.dtype != torch.float32 or not weight.is_contiguous():
        return native_ops.rms_norm(x, weight, eps)
    return kernels.rms_norm(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    kernels = _kernels()
    if (
        kernels is None
        or not (_rows(x) and x.is_contiguous() and residual.is_contiguous())
        or residual.shape != x.shape
        or residual.dtype != torch.float32
        or weight.dtype != torch.float32
        or not weight.is_contiguous()
    ):
        return native_ops.fused_add_rms_norm(x, residual, weight, eps)
    return kernels.fused_add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    kernels = _kernels()
    if kernels is None or not (_rows(x) and x.is_contiguous()) or x.shape[1] % 2:
        return native_ops.silu_and_mul(x)
    return kernels.silu_and_mul(x)


def _heads_contiguous(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2]


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    kernels = _kernels()
    if (
        kernels is None
        or query.device.type != "cpu"
        or not (_heads_contiguous(query) and _heads_contiguous(key))
        or key.shape[0] != query.shape[0]
        or key.shape[2] != query.shape[2]
        or positions.dtype != torch.int64
        or positions.shape != (query.shape[0],)
        or cos_sin_cache.dtype != torch.float32
        or cos_sin_cache.shape[1] > query.shape[2]
        or cos_sin_cache.shape[1] % 2
    ):
        return native_ops.rotary_embedding(positions, query, key, cos_sin_cache, is_neox_style)
    return kernels.rotary(positions.contiguous(), query, key, cos_sin_cache.contiguous(), is_neox_style)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Structured outputs' mask, in place: one C pass over the packed words (no [M, V] bool temporaries)."""
    kernels = _kernels()
    if (
        kernels is None
        or logits.device.type != "cpu"
        or logits.dtype != torch.float32
        or logits.dim() != 2
        or logits.stride(1) != 1
        or bitmask.dtype != torch.int32
        or not bitmask.is_contiguous()
        or indices.dtype != torch.int64
        or not indices.is_contiguous()
        or bitmask.shape[0] != indices.shape[0]
    ):
        return native_ops.apply_token_bitmask(logits, bitmask, indices)
    if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < logits.shape[0]:
        raise IndexError(f"apply_token_bitmask: row indices outside the {logits.shape[0]} logits rows")
    kernels.apply_token_bitmask(logits, bitmask, indices)
    return logits


def register_ops(registry: PluginRegistry) -> None:
    """Register the CPU overrides (see the module docstring for what and why)."""
    registry.override_op("packed_linear", packed_linear, owner="cpu")
    registry.override_op("rms_norm", rms_norm, owner="cpu")
    registry.override_op("fused_add_rms_norm", fused_add_rms_norm, owner="cpu")
    registry.override_op("silu_and_mul", silu_and_mul, owner="cpu")
    registry.override_op("rotary_embedding", rotary_embedding, owner="cpu")
    registry.override_op("apply_token_bitmask", apply_token_bitmask, owner="cpu")
