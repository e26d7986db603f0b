"""CPU op overrides: C kernels (kernels/cpu_ops.c, gguf_linear.c) for fp32 tensors.

rms_norm, fused_add_rms_norm, silu_and_mul and rotary_embedding: at decode sizes each is a few
microseconds of arithmetic, but the torch-native expression is 4-20 dispatched ops (tens of
microseconds); one C call per op removes that, 30 layers a step. Other dtypes, layouts the
kernels do not take, or kernels that could not be built: the core's native op.

``packed_linear`` (the core's linear layers call it for every fp32 matmul) takes one of two kernels:
- GGUF blocks multiplied directly (kernels/gguf_linear.c: Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K),
  at EVERY batch size when the layer keeps only its blocks (``weight`` on the meta device: the
  loader's default wherever ``packed_linear.supports`` says yes, so a quantized model holds no
  dense fp32 copy; a fused layer whose parts differ in format, e.g. Q4_K q/k and a Q6_K v, is
  multiplied part by part), and, beside a dense weight, for steps of at most ``packed_max_rows()`` token
  rows (8 with AVX-512, 1 with AVX2; never with the portable build). Small steps dequantize the
  blocks in registers (memory-bound: a Q4_K weight is 4.5 bits instead of 32); larger ones
  dequantize a panel of rows once into an L2-resident fp32 buffer and run a register-tiled fp32
  GEMM over it (compute-bound).
- otherwise the dense fp32 weight, re-laid out once into column panels (kernels/fp32_gemm.c, the
  panels made at first use and kept beside the weight, so they cost one more copy of the weights):
  batched steps are compute-bound and this runs them 1.2-3x faster than MKL's sgemm.
Both give the dense weight's fp32 products up to summation order (the block kernel dequantizes to
exactly gguf's fp32 weights). Each kernel sums an output in one fixed order whatever the number of
rows or threads, so a token row's result does not depend on its batch mates (on a blocks-only
layer every step takes the block kernel; beside a dense weight, steps above the row limit take the
panel kernel, whose order differs).

Arithmetic: fp32 activations times weights dequantized exactly, or gguf_int8.c: llama.cpp's
arithmetic (each activation row quantized to int8 per block, AVX-512 VNNI integer dot products),
batch- and thread-invariant like the fp32 kernels, ~2-4x faster per one-token step on K-quants from
memory, but each output moves by up to half a quantization step of its input blocks (past the
conformance suite's fp32 tolerance). ``PAGEDLLM_CPU_INT8_DOT``: ``on`` runs blocks-only layers on
it at every step size, ``decode`` only for steps of fewer than 16 token rows (decode-sized,
memory-bound steps, where it pays; batched steps stay exact or go to bf16, bf16_matmul.py), ``off``
never. Unset: ``decode`` when the dtype is left to the platform (``--dtype auto``, the default)
and the build has VNNI, ``off`` with an explicit ``--dtype float32`` (``default_for_dtype``). A
layer whose width the int8 layout cannot take (not whole pairs of 32-blocks / whole 256-blocks)
stays exact at every step.

Measured with benchmarks/bench_gguf_kernels.py --cold (weights read from memory, as in decoding;
AMD EPYC with AVX-512 VNNI, no AMX, 2026-12-06, load ~1.3 from one other job), GFLOP/s, exact fp32
block kernel / int8 kernel:
- one token, 2 threads: SmolLM2's Q4_1 576x576 24 / 34, 1536x576 35 / 55, 576x1536 37 / 58, its
  Q8_0 LM head 49152x576 54 / 83; Llama-3.2-1B's Q4_K 2048x2048 42 / 97, 8192x2048 45 / 119,
  2048x8192 39 / 120, Q6_K 35 / 77, 37 / 86, 27 / 84 (the int8 kernel streams ~30 GB/s of blocks;
  this host reads ~47 GB/s at most with 2 threads). The fp32 panels of a dense weight: 17-29.
- batched, 1 thread: Q4_K 2048x2048 at 64 rows 69 / 146, at 512 rows 79 / 148 (fp32 panels 111-112);
  Q6_K 65 / 120, 76 / 129; SmolLM2's Q4_1 576x1536 at 64 rows 81 / 97 (panels 114).
So the exact kernels run decode steps ~2x faster than a dense fp32 weight and batched steps at
~60-70% of the panel GEMM with no dense copy; the int8 kernel another ~1.5-2.7x for one token and
~2x for batched K-quant steps (1.1-1.3x for the 32-weight formats, whose per-block scales cost an
fp32 multiply-add per 32 weights).

``packed_embedding`` (the token embedding kept as blocks, e.g. Q8_0 or Q6_K): the selected rows
dequantized in C, when the core has that op.

Steps of 16+ token rows may instead run in bf16 where measured faster (bf16_matmul.py; switch
PAGEDLLM_CPU_BF16_GEMM, unset: on with --dtype auto on AMX hosts): on AMX tiles through
gguf_linear.c's own kernel, packed from the blocks or the fp32 rows at each step (no copy), or
kept once packed (PAGEDLLM_CPU_AMX_TILES: a small model by default, any with on), or elsewhere
through oneDNN on a bf16 copy.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from pagedllm.plugin import OPS, PackedWeight, PluginRegistry, native_ops
from torch.utils.weak import WeakIdKeyDictionary

from pagedllm_cpu import bf16_matmul
from pagedllm_cpu.env_default import EnvDefault
from pagedllm_cpu.kernels import clib

logger = logging.getLogger(__name__)

# Token rows up to which GGUF blocks are multiplied directly; None: what the built kernels say
# (gguf_linear.c, pagedllm_gguf_max_rows: it depends on the instruction set). Tests set it to
# exercise the block kernel at every batch size.
PACKED_MAX_ROWS: int | None = None


INT8_ENV = "PAGEDLLM_CPU_INT8_DOT"
INT8_MODES = ("off", "decode", "on")
INT8_DECODE_ROWS = 16  # mode 'decode': steps of fewer token rows (bf16_matmul.BUCKETS[0]: the rest may go to bf16)
_int8_default = EnvDefault(INT8_ENV)


def int8_mode() -> str:
    """``PAGEDLLM_CPU_INT8_DOT``: ``off`` (the exact fp32 block kernels), ``decode`` (int8 activations
    and VNNI integer dot products for steps of fewer than 16 token rows) or ``on`` (at every step
    size); needs a build with AVX-512 VNNI. Unset: see ``default_for_dtype`` (README: "int8
    activations")."""
    raw = os.environ.get(INT8_ENV, "off").strip().lower() or "off"
    if raw not in INT8_MODES:
        raise ValueError(f"{INT8_ENV}={raw!r}: expected one of {', '.join(INT8_MODES)}")
    return raw


def default_for_dtype(dtype_auto: bool) -> None:
    """The switch when the user left it unset (CpuPlatform's check_and_update_config): ``decode``
    with ``--dtype auto`` where the kernels have VNNI (greedy parity with transformers holds under
    the conformance suite's top-k containment rule, tested), ``off`` with an explicit ``--dtype
    float32``. A value the user set always wins (env_default.py)."""
    kernels = _kernels()
    _int8_default.apply("decode" if dtype_auto and kernels is not None and kernels.int8_dot else None)


def check_int8_mode(kernels: clib.CpuKernels | None) -> None:
    """At startup: a bad value, or int8 asked for where the kernels have no int8 path, is a readable error."""
    if int8_mode() != "off" and (kernels is None or not kernels.int8_dot):
        why = "the CPU kernels are not built" if kernels is None else f"this {kernels.isa} build has no AVX-512 VNNI"
        raise ValueError(f"{INT8_ENV}={int8_mode()} but {why}; unset it to use the fp32 block kernels")


def describe_int8() -> str:
    """The block kernels' arithmetic, for ``pagedllm env``."""
    kernels = _kernels()
    has = kernels is not None and kernels.int8_dot
    build = "this build has it (AVX-512 VNNI)" if has else "this build has none (needs AVX-512 VNNI)"
    try:
        mode = int8_mode()
    except ValueError as exc:
        return f"GGUF blocks: {exc}"
    if mode == "on" and has:
        return f"GGUF blocks: int8 activations, VNNI dot products, every step ({INT8_ENV}=on)"
    if mode == "decode" and has:
        return (f"GGUF blocks: int8 activations, VNNI dot products, steps of < {INT8_DECODE_ROWS} rows; "
                f"exact fp32 above ({INT8_ENV}=decode)")
    unset = " (unset: decode with --dtype auto, off with --dtype float32)" if INT8_ENV not in os.environ else ""
    return f"GGUF blocks: exact fp32 ({INT8_ENV}={mode}{unset}; int8 activations: {build})"


def int8_dot(kernels: clib.CpuKernels, ggml_type: int, k: int, rows: int = 1) -> bool:
    """Whether a blocks-only layer of this format and input width multiplies a step of ``rows``
    token rows with int8 activations (a layer whose width the int8 layout cannot take stays on the
    fp32 kernel at every step)."""
    mode = int8_mode()
    if mode == "off" or (mode == "decode" and rows >= INT8_DECODE_ROWS):
        return False
    return kernels.int8_takes(ggml_type, k)


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


class PackedWeightUnusable(RuntimeError):
    """A layer keeps only its GGUF blocks (dense weight on the meta device) and they cannot be multiplied here."""


def blocks_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedWeight | None, amx: bool = False
) -> torch.Tensor:
    """x weight^T + bias for a layer whose weight exists only as ``packed`` (``weight`` is on meta).

    amx: in bf16 on AMX tiles (bf16_matmul.py routes steps there), else the exact or int8 kernels."""
    kernels = _kernels()
    runs = () if packed is None else getattr(packed, "parts", ()) or (packed,)  # a fused layer's formats
    missing = [p.ggml_type for p in runs if p.ggml_type not in clib.TYPE_SIZES]
    why = None
    if packed is None:
        why = "the layer has no blocks"
    elif kernels is None:
        why = f"the CPU kernels are {clib.status()[1]}"
    elif missing:
        why = f"GGML type {missing[0]} has no CPU kernel"
    elif x.dtype != torch.float32 or x.device.type != "cpu":
        why = f"the input is {x.dtype} on {x.device} (the kernels take fp32 on the CPU)"
    elif x.shape[-1] != weight.shape[1] or packed.out_features != weight.shape[0]:
        why = f"input {tuple(x.shape)} and blocks of {packed.out_features} rows do not fit weight {tuple(weight.shape)}"
    if why is not None:
        raise PackedWeightUnusable(
            f"packed_linear: the layer keeps only its GGUF blocks (no dense weight) but {why}; "
            "load the model with --quantized-weights dense"
        )
    lead = x.shape[:-1]
    flat = x.detach().reshape(-1, x.shape[-1]).contiguous()
    k = flat.shape[1]
    def part(p: PackedWeight) -> torch.Tensor:
        tiles = bf16_matmul.amx_tiles(kernels, p.data, p.ggml_type, p.data, p.out_features) if amx else None
        if tiles is not None:
            return kernels.amx_tiles_linear(flat, tiles, p.out_features)
        return kernels.linear(
            flat, p.ggml_type, p.data, p.out_features, int8=not amx and int8_dot(kernels, p.ggml_type, k, flat.shape[0]),
            amx=amx,
        )

    # a fused layer of parts: each part's product is its own columns of the output
    y = part(packed) if len(runs) == 1 else torch.cat([part(p) for p in runs], dim=1)
    if bias is not None:
        y.add_(bias)
    return y.reshape(*lead, packed.out_features)


def packed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedWeight | None
) -> torch.Tensor:
    """x weight^T + bias: bf16 where routed (many rows, measured faster), else GGUF blocks (always
    when there is no dense weight, else for a few rows), else the pre-packed fp32 weight, else torch."""
    if bf16_matmul.routes(x, weight, bias, packed, packed_linear):  # many rows, bf16 measured faster
        return bf16_matmul.linear(x, weight, bias, packed)
    if weight.device.type == "meta":
        return blocks_linear(x, weight, bias, packed)
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


def _supports(ggml_type: int | tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether the loader may keep only a layer's blocks: the kernels are built and take the format
    (each format of a layer made of parts) at every row count (fp32 models)."""
    types = ggml_type if isinstance(ggml_type, tuple) else (ggml_type,)
    if dtype != torch.float32 or any(t not in clib.TYPE_SIZES for t in types):
        return False
    kernels, why = clib.status()
    if kernels is None:
        if clib.wanted() == "1":
            raise clib.KernelUnavailable(f"{clib.KERNELS_ENV}=1 but the GGUF kernels are {why}")
        logger.info("GGUF blocks not kept: the CPU kernels are %s", why)
        return False
    return True


packed_linear.supports = _supports  # type: ignore[attr-defined]


def packed_embedding(ids: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """Rows ``ids`` of a block matrix, dequantized: fp32 [*ids.shape, in_features]."""
    kernels = _kernels()
    if kernels is None or packed.ggml_type not in clib.TYPE_SIZES:
        return native_ops.packed_embedding(ids, packed)
    flat = ids.reshape(-1)
    if flat.dtype != torch.int64 or flat.device.type != "cpu":
        flat = flat.to(device="cpu", dtype=torch.int64)
    rows = kernels.rows(packed.ggml_type, packed.data, packed.in_features, flat.contiguous())
    return rows.reshape(*ids.shape, packed.in_features)


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


def packed_linear_silu_and_mul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedWeight | None
) -> torch.Tensor:
    """A gated MLP's [gate; up] projection and SiLU-and-mul. Where the step is routed to the own AMX
    kernel with kept tiles, one kernel call that never writes the [T, 2 d] projection (the same values
    bit for bit); everywhere else the two ops. Both through the registry unless they are this module's:
    a plugin that overrides either (e.g. a test's fault injection) is not bypassed by the fusion."""
    if OPS.silu_and_mul is not silu_and_mul or OPS.packed_linear is not packed_linear:
        return OPS.silu_and_mul(OPS.packed_linear(x, weight, bias, packed))
    if bias is None and bf16_matmul.routes(x, weight, bias, packed, packed_linear):
        tiles = bf16_matmul.silu_tiles(weight, packed)
        kernels = _kernels()
        if tiles is not None and kernels is not None:
            flat = x.detach().reshape(-1, x.shape[-1]).contiguous()
            d = weight.shape[0] // 2
            return kernels.amx_tiles_linear_silu(flat, *tiles, d).reshape(*x.shape[:-1], d)
        return silu_and_mul(bf16_matmul.linear(x, weight, bias, packed))
    return silu_and_mul(packed_linear(x, weight, bias, packed))


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
    try:  # a core without the op (older than its GGUF-blocks embedding) keeps what it has
        registry.override_op("packed_embedding", packed_embedding, owner="cpu")
    except KeyError:
        logger.debug("the core has no packed_embedding op; not overriding it")
    try:  # a core older than plugin API 1.4 has no fused gated-MLP op
        registry.override_op("packed_linear_silu_and_mul", packed_linear_silu_and_mul, owner="cpu")
    except KeyError:
        logger.debug("the core has no packed_linear_silu_and_mul op; not overriding it")
