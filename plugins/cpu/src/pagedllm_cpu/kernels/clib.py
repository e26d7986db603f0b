"""The CPU backend's C kernels (``gguf_linear.c``, ``cpu_ops.c``, ``fp32_gemm.c``), built with the host's C compiler, called via ctypes.

- fp32 matmuls on weights re-laid out once into column panels (``fp32_gemm.c``): batched steps
  of 8-256 token rows run 1.2-3x faster than MKL's sgemm, which re-packs the weight every call.

- GGUF-block matmuls at any batch size: a GGUF checkpoint's Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K /
  Q6_K blocks stay packed (4.5-8.5 bits per weight instead of 32), so a decode step reads a
  fraction of the memory and the model needs no dense fp32 copy; batched steps dequantize tiles
  of the weight into an L2-resident buffer and stay compute-bound. The weights are dequantized to
  exactly the fp32 values gguf's dequantization gives, the arithmetic is fp32, and every output
  is summed in one fixed order (batch- and thread-invariant). Embedding rows are dequantized
  from the blocks too (``rows``).
- fp32 RMSNorm (plain and fused with the residual add), rotary, SiLU-and-mul, KV-cache writes and
  paged attention read straight from the block tables: each replaces several dispatched torch ops
  (or a gather + SDPA) with one call.

The library is compiled on first use (``-O3 -march=native -fopenmp``, about two seconds) into a
cache directory keyed by the sources, the compiler and the flags: ``$PAGEDLLM_CPU_KERNEL_CACHE``,
else ``$XDG_CACHE_HOME/pagedllm`` or ``~/.cache/pagedllm``. Without a compiler (or when
``PAGEDLLM_CPU_KERNELS=0``) the kernels are unavailable, ``pagedllm env`` says why, and the
backend runs on torch ops and dense fp32 weights: same results up to summation order.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

logger = logging.getLogger(__name__)

KERNELS_ENV = "PAGEDLLM_CPU_KERNELS"  # auto (default) | 0 | 1 (required)
CACHE_ENV = "PAGEDLLM_CPU_KERNEL_CACHE"
SOURCES = tuple(Path(__file__).with_name(name) for name in ("gguf_linear.c", "gguf_int8.c", "cpu_ops.c", "fp32_gemm.c"))
# GGML type id -> bytes per block, weights per block and name, for the formats gguf_linear.c takes.
TYPE_SIZES = {2: 18, 3: 20, 8: 34, 12: 144, 13: 176, 14: 210}  # Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K
BLOCK_WEIGHTS = {2: 32, 3: 32, 8: 32, 12: 256, 13: 256, 14: 256}
TYPE_NAMES = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}
GGML_F32 = 0  # GGML's type number for plain fp32 rows (a dense weight; the AMX kernel takes it)
# Kept AMX tiles' formats (gguf_linear.c, "Compact kept tiles"): bf16 tiles, or a quantized type's
# integers and fp32 scales in the tiles' order, expanded into the same bf16 tiles at each step.
AMX_BF16 = 0
AMX_FORMATS = {AMX_BF16: "bf16", 1: "4-bit", 2: "4-bit (offset 8)", 3: "8-bit", 4: "8-bit (scales per 16)"}
# -ffp-contract=off: no silent fused multiply-adds, so elementwise ops round like torch's.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-ffp-contract=off")


# The kernels' thread-count argument: 0 means the calling thread's current OpenMP default (what
# torch.set_num_threads sets), so a captured step replays with the count of the moment, which the
# CPU backend lowers while other processes keep cores busy (contention.py).
CURRENT_THREADS = 0

# The call list of a decode step being captured (see capture.py), else None.
_recording: list[tuple[str, Any, tuple[Any, ...]]] | None = None


def start_recording() -> list[tuple[str, Any, tuple[Any, ...]]]:
    global _recording
    if _recording is not None:
        raise RuntimeError("a capture is already recording kernel calls")
    _recording = []
    return _recording


def stop_recording() -> None:
    global _recording
    _recording = None


class AmxTiles(NamedTuple):
    """A weight's kept AMX tiles (``CpuKernels.amx_pack``): the bytes and their format (``AMX_FORMATS``)."""

    data: torch.Tensor
    fmt: int

    def nbytes(self) -> int:
        return self.data.numel()


class KernelUnavailable(RuntimeError):
    """The GGUF kernels cannot be built or loaded here; the message says why."""


KV_CACHE_DTYPES = (torch.float32, torch.bfloat16)  # what write_kv and paged_attention take


def check_kv_cache_dtype(kv_cache: torch.Tensor) -> None:
    if kv_cache.dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"the C kernels keep the KV cache in float32 or bfloat16, not {kv_cache.dtype}")


def _check_gguf_rc(rc: int, name: str, inputs: str) -> None:
    """gguf_linear.c's return codes as exceptions: -4 scratch allocation, -5 no AMX, else rejected inputs."""
    if rc == -4:
        raise MemoryError(f"{name} could not allocate its scratch buffers")
    if rc == -5:
        raise ValueError(f"{name}: this build or the OS has no AMX tiles (see amx_bf16)")
    if rc != 0:
        raise ValueError(f"{name} rejected its inputs (code {rc}): {inputs}")


@dataclass(frozen=True, slots=True)
class CpuKernels:
    lib: ctypes.CDLL
    path: str
    # Token rows up to which ``linear`` on GGUF blocks beats ``gemm`` on this build (0: never).
    gguf_max_rows: int
    # The vector code this build runs: "AVX-512", "AVX2" or "portable".
    isa: str
    # Whether this build has gguf_int8.c's kernel (AVX-512 VNNI): ``linear(..., int8=True)``.
    int8_dot: bool = False
    # Whether this build multiplies blocks in bf16 on AMX tiles (gguf_linear.c; AMX-BF16 and the OS's
    # permission for tile data): ``linear(..., amx=True)``.
    amx_bf16: bool = False

    def _call(self, name: str, *args: Any) -> Any:
        """Call a kernel; while a decode step is being captured (capture.py), also record the call."""
        fn = getattr(self.lib, name)
        if _recording is not None:
            _recording.append((name, fn, args))
        return fn(*args)

    def linear(
        self,
        x: torch.Tensor,
        qtype: int,
        packed: torch.Tensor,
        out_features: int,
        threads: int = CURRENT_THREADS,
        int8: bool = False,
        amx: bool = False,
    ) -> torch.Tensor:
        """x [m, k] fp32 contiguous @ W^T, W given as packed [out_features, k / block * type_size] uint8.

        int8: x quantized to int8 per block and integer dot products (gguf_int8.c; needs ``int8_dot``
        and ``int8_takes``); amx: x and the dequantized weights rounded to bf16 and multiplied on AMX
        tiles with fp32 sums (needs ``amx_bf16``); else the exact fp32 kernel (gguf_linear.c)."""
        m, k = x.shape
        if (
            x.dtype != torch.float32
            or not x.is_contiguous()
            or packed.dtype != torch.uint8
            or not packed.is_contiguous()
            or packed.dim() != 2
            or packed.shape[0] != out_features
        ):
            raise ValueError(
                f"gguf_linear takes contiguous fp32 x and contiguous uint8 blocks of {out_features} rows; got "
                f"x {x.dtype} {tuple(x.shape)}, packed {packed.dtype} {tuple(packed.shape)}"
            )
        y = torch.empty((m, out_features), dtype=torch.float32)
        rc = self._call(
            "pagedllm_gguf_linear_amx" if amx else "pagedllm_gguf_linear_int8" if int8 else "pagedllm_gguf_linear",
            qtype,
            x.data_ptr(),
            m,
            k,
            packed.data_ptr(),
            out_features,
            packed.shape[1],
            y.data_ptr(),
            threads,
        )
        _check_gguf_rc(rc, "gguf_linear", f"type {qtype}, x {tuple(x.shape)}, packed {tuple(packed.shape)}")
        return y

    def amx_dense(self, x: torch.Tensor, weight: torch.Tensor, threads: int = CURRENT_THREADS) -> torch.Tensor:
        """x [m, k] fp32 @ weight^T for a dense fp32 weight [n, k], both rounded to bf16 and multiplied on
        AMX tiles with fp32 sums: ``linear`` with amx=True on the weight's bytes as rows of GGML type F32
        (gguf_linear.c; needs ``amx_bf16`` and k a multiple of 32)."""
        if weight.dtype != torch.float32 or not weight.is_contiguous() or weight.dim() != 2:
            raise ValueError(f"amx_dense takes a contiguous fp32 weight [n, k]; got {weight.dtype} {tuple(weight.shape)}")
        return self.linear(x, GGML_F32, weight.view(torch.uint8), weight.shape[0], threads, amx=True)

    def amx_tile_format(self, qtype: int) -> int:
        """The compact format kept tiles of GGML type ``qtype`` take (``AMX_FORMATS``), or AMX_BF16 for a
        dense weight (GGML_F32) and a type without one."""
        return int(self.lib.pagedllm_amx_tile_format(qtype))

    def amx_pack(
        self, qtype: int, packed: torch.Tensor, out_features: int, threads: int = CURRENT_THREADS, compact: bool = True
    ) -> AmxTiles:
        """The B tiles that ``linear(..., amx=True)`` packs from these rows at every step, packed once for
        ``amx_tiles_linear``: uint8, whole 32-row panels, 64-byte aligned. compact: in the type's compact
        format (``amx_tile_format``: its integers and fp32 scales, 0.75-1.5 bytes a weight, expanded into
        the same bf16 tiles at each step); else bf16 tiles (2 bytes a weight). ``packed`` as in ``linear``
        (GGML_F32 for a dense fp32 weight's bytes, whose tiles are always bf16)."""
        if packed.dtype != torch.uint8 or not packed.is_contiguous() or packed.dim() != 2 or packed.shape[0] != out_features:
            raise ValueError(
                f"amx_pack takes contiguous uint8 rows [{out_features}, bytes]; got {packed.dtype} {tuple(packed.shape)}"
            )
        if qtype != GGML_F32 and qtype not in TYPE_SIZES:
            raise ValueError(f"amx_pack: GGML type {qtype} has no CPU kernel")
        k = packed.shape[1] // 4 if qtype == GGML_F32 else packed.shape[1] // TYPE_SIZES[qtype] * BLOCK_WEIGHTS[qtype]
        fmt = self.amx_tile_format(qtype) if compact else AMX_BF16
        size = self.lib.pagedllm_amx_tiles_bytes(fmt, k, out_features)
        base = torch.empty(size + 64, dtype=torch.uint8)
        offset = -base.data_ptr() % 64
        tiles = base[offset : offset + size]  # the view keeps its base alive
        rc = self._call(
            "pagedllm_amx_pack", qtype, packed.data_ptr(), k, out_features, packed.shape[1], fmt, tiles.data_ptr(), threads
        )
        _check_gguf_rc(rc, "amx_pack", f"type {qtype}, packed {tuple(packed.shape)}")
        return AmxTiles(tiles, fmt)

    def _check_tiles(self, name: str, tiles: AmxTiles, k: int, rows: int) -> None:
        if tiles.fmt not in AMX_FORMATS:
            raise ValueError(f"{name}: unknown tile format {tiles.fmt}")
        data = tiles.data
        if data.dtype != torch.uint8 or data.dim() != 1 or not data.is_contiguous():
            raise ValueError(f"{name} takes contiguous uint8 tiles; got {data.dtype} {tuple(data.shape)}")
        if data.numel() != self.lib.pagedllm_amx_tiles_bytes(tiles.fmt, k, rows):
            raise ValueError(
                f"{name}: {data.numel()} bytes of {AMX_FORMATS[tiles.fmt]} tiles are not {rows} rows of {k}"
            )

    def amx_tiles_linear(
        self, x: torch.Tensor, tiles: AmxTiles, out_features: int, threads: int = CURRENT_THREADS
    ) -> torch.Tensor:
        """x [m, k] fp32 contiguous times the weight ``tiles`` were packed from (``amx_pack``): the same
        result as ``linear(..., amx=True)`` on that weight, bit for bit, without packing at each step."""
        m, k = x.shape
        if x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"amx_tiles_linear takes contiguous fp32 x; got {x.dtype}")
        self._check_tiles("amx_tiles_linear", tiles, k, out_features)
        y = torch.empty((m, out_features), dtype=torch.float32)
        rc = self._call(
            "pagedllm_amx_linear_tiles", x.data_ptr(), m, k, tiles.data.data_ptr(), tiles.fmt, out_features, y.data_ptr(), threads
        )
        _check_gguf_rc(rc, "amx_tiles_linear", f"x {tuple(x.shape)}")
        return y

    def amx_tiles_linear_silu(
        self, x: torch.Tensor, gate: AmxTiles, up: AmxTiles, d: int, threads: int = CURRENT_THREADS
    ) -> torch.Tensor:
        """silu(x G^T) * (x U^T), [m, d], from the kept tiles of a gated MLP's gate and up projections (d rows
        each, d a whole number of 32-row panels, one format): ``silu_and_mul`` of ``amx_tiles_linear`` over
        [G; U], bit for bit, without writing the [m, 2d] projection."""
        m, k = x.shape
        if x.dtype != torch.float32 or not x.is_contiguous() or d % 32 != 0:
            raise ValueError(f"amx_tiles_linear_silu takes contiguous fp32 x and d a multiple of 32; got x {x.dtype}, d {d}")
        if gate.fmt != up.fmt:
            raise ValueError(f"amx_tiles_linear_silu: gate and up tiles differ in format ({gate.fmt}, {up.fmt})")
        for name, t in (("gate", gate), ("up", up)):
            self._check_tiles(f"amx_tiles_linear_silu ({name})", t, k, d)
        y = torch.empty((m, d), dtype=torch.float32)
        rc = self._call(
            "pagedllm_amx_linear_tiles_silu", x.data_ptr(), m, k, gate.data.data_ptr(), up.data.data_ptr(), gate.fmt, d,
            y.data_ptr(), threads,
        )
        _check_gguf_rc(rc, "amx_tiles_linear_silu", f"x {tuple(x.shape)}, d {d}")
        return y

    def argmax_rows(self, x: torch.Tensor, threads: int = CURRENT_THREADS) -> torch.Tensor:
        """Each row's argmax of x [m, n] fp32 (rows may be strided, features contiguous): the first
        maximum, a NaN counting as the maximum, exactly as ``torch.max(x, -1).indices``. -> [m] int64"""
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] == 0 or x.stride(1) != 1:
            raise ValueError(f"argmax_rows takes fp32 [m, n > 0] with contiguous rows; got {x.dtype} {tuple(x.shape)}")
        out = torch.empty(x.shape[0], dtype=torch.int64)
        rc = self._call("pagedllm_argmax_rows", x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr(), threads)
        if rc != 0:
            raise ValueError(f"argmax_rows rejected x {tuple(x.shape)} (row stride {x.stride(0)})")
        return out

    def int8_takes(self, qtype: int, k: int) -> bool:
        """Whether the int8 kernel takes this format and row length (K-quants: whole 256-blocks;
        the 32-weight formats: whole pairs of blocks)."""
        return self.int8_dot and qtype in TYPE_SIZES and k > 0 and k % (256 if BLOCK_WEIGHTS[qtype] == 256 else 64) == 0

    def rows(self, qtype: int, packed: torch.Tensor, k: int, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the block matrix ``packed`` dequantized: fp32 [len(ids), k] (embedding lookups)."""
        if (
            packed.dtype != torch.uint8
            or not packed.is_contiguous()
            or packed.dim() != 2
            or ids.dtype != torch.int64
            or ids.dim() != 1
            or not ids.is_contiguous()
        ):
            raise ValueError(
                f"gguf_rows takes contiguous uint8 blocks [rows, bytes] and contiguous int64 ids [T]; got "
                f"packed {packed.dtype} {tuple(packed.shape)}, ids {ids.dtype} {tuple(ids.shape)}"
            )
        out = torch.empty((ids.shape[0], k), dtype=torch.float32)
        rc = self._call(
            "pagedllm_gguf_rows",
            qtype,
            packed.data_ptr(),
            packed.shape[0],
            k,
            ids.data_ptr(),
            ids.shape[0],
            out.data_ptr(),
            CURRENT_THREADS,
        )
        if rc == -3:
            raise IndexError(f"gguf_rows: an id is outside the {packed.shape[0]} rows of the block matrix")
        if rc != 0:
            raise ValueError(f"gguf_rows rejected type {qtype} with k={k} (code {rc})")
        return out

    def gemm_pack(self, weight: torch.Tensor) -> torch.Tensor:
        """weight [n, k] fp32 (rows may be strided) laid out as fp32_gemm.c's column panels."""
        n, k = weight.shape
        if weight.dtype != torch.float32 or weight.stride(1) != 1 or n == 0 or k == 0:
            raise ValueError(
                f"gemm_pack takes a non-empty fp32 [n, k] weight with contiguous rows, got "
                f"{weight.dtype} {tuple(weight.shape)} strides {weight.stride()}"
            )
        width = self.lib.pagedllm_gemm_panel_width()
        panels = torch.empty(-(-n // width) * k * width, dtype=torch.float32)
        # Not recorded by a capture: panels are made once per weight, before any replay.
        rc = self.lib.pagedllm_gemm_pack(
            weight.data_ptr(), n, k, weight.stride(0), panels.data_ptr(), CURRENT_THREADS
        )
        if rc != 0:
            raise ValueError(f"gemm_pack rejected weight {tuple(weight.shape)} (code {rc})")
        return panels

    def gemm(
        self, x: torch.Tensor, panels: torch.Tensor, out_features: int, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x [m, k] fp32 (features contiguous) @ W^T + bias, W given as gemm_pack's panels of [out_features, k]."""
        m, k = x.shape
        width = self.lib.pagedllm_gemm_panel_width()
        if (
            x.dtype != torch.float32
            or x.stride(1) != 1
            or panels.numel() != -(-out_features // width) * k * width
            or (
                bias is not None
                and (bias.dtype != torch.float32 or not bias.is_contiguous() or bias.shape != (out_features,))
            )
        ):
            raise ValueError(
                f"gemm takes fp32 x with contiguous features and panels of {out_features} x {k}; got x {x.dtype} "
                f"{tuple(x.shape)}, {panels.numel()} panel floats, bias "
                f"{None if bias is None else (bias.dtype, tuple(bias.shape))}"
            )
        y = torch.empty((m, out_features), dtype=torch.float32)
        rc = self._call(
            "pagedllm_gemm",
            x.data_ptr(),
            m,
            k,
            x.stride(0) if m > 1 else k,
            panels.data_ptr(),
            out_features,
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            out_features,
            CURRENT_THREADS,
        )
        if rc != 0:
            raise ValueError(f"gemm rejected x {tuple(x.shape)} for {out_features} outputs (code {rc})")
        return y

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [m, n] fp32 (rows may be strided, features contiguous), weight [n] contiguous."""
        m, n = x.shape
        out = torch.empty((m, n), dtype=torch.float32)
        self._call(
            "pagedllm_rms_norm",
            x.data_ptr(),
            x.stride(0),
            weight.data_ptr(),
            eps,
            out.data_ptr(),
            m,
            n,
            CURRENT_THREADS,
        )
        return out

    def fused_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [m, n] contiguous fp32 -> (rms_norm(x + residual), x + residual)."""
        m, n = x.shape
        out, summed = torch.empty((m, n), dtype=torch.float32), torch.empty((m, n), dtype=torch.float32)
        self._call(
            "pagedllm_fused_add_rms_norm",
            x.data_ptr(),
            residual.data_ptr(),
            weight.data_ptr(),
            eps,
            out.data_ptr(),
            summed.data_ptr(),
            m,
            n,
            CURRENT_THREADS,
        )
        return out, summed

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x [m, 2d] contiguous fp32 -> [m, d]."""
        m, d = x.shape[0], x.shape[1] // 2
        out = torch.empty((m, d), dtype=torch.float32)
        self._call("pagedllm_silu_and_mul", x.data_ptr(), out.data_ptr(), m, d, CURRENT_THREADS)
        return out

    def apply_token_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor, indices: torch.Tensor) -> None:
        """logits [N, V] fp32 with contiguous rows, bitmask [M, W] int32 contiguous, indices [M] int64."""
        n = min(logits.shape[1], bitmask.shape[1] * 32)
        self._call(
            "pagedllm_apply_token_bitmask",
            logits.data_ptr(),
            logits.stride(0),
            bitmask.data_ptr(),
            bitmask.shape[1],
            indices.data_ptr(),
            bitmask.shape[0],
            n,
        )

    def rotary(
        self,
        positions: torch.Tensor,  # [m] int64 contiguous
        query: torch.Tensor,  # [m, heads, head_size] fp32, heads and features contiguous
        key: torch.Tensor,
        cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] fp32 contiguous
        neox: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m, heads, head_size = query.shape
        q_out, k_out = (
            torch.empty(query.shape, dtype=torch.float32),
            torch.empty(key.shape, dtype=torch.float32),
        )
        rc = self._call(
            "pagedllm_rotary",
            query.data_ptr(),
            query.stride(0),
            key.data_ptr(),
            key.stride(0),
            q_out.data_ptr(),
            k_out.data_ptr(),
            m,
            heads,
            key.shape[1],
            head_size,
            positions.data_ptr(),
            cos_sin_cache.data_ptr(),
            cos_sin_cache.shape[0],
            cos_sin_cache.shape[1],
            int(neox),
        )
        if rc != 0:
            raise IndexError(f"a rotary position is outside the cache's [0, {cos_sin_cache.shape[0]})")
        return q_out, k_out

    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor
    ) -> None:
        """key/value [m, kv_heads, head_size] fp32 (heads contiguous) into kv_cache [2, blocks, kv_heads, block,
        head] (fp32, or bf16 rounded to nearest even) at slots [m] int64 contiguous; slot -1 is skipped."""
        _, num_blocks, kv_heads, block_size, head_size = kv_cache.shape
        check_kv_cache_dtype(kv_cache)
        self._call(
            "pagedllm_write_kv",
            key.data_ptr(),
            key.stride(0),
            value.data_ptr(),
            value.stride(0),
            kv_cache.data_ptr(),
            slots.data_ptr(),
            slots.shape[0],
            num_blocks,
            kv_heads,
            block_size,
            head_size,
            kv_cache.dtype == torch.bfloat16,
        )

    def paged_attention(
        self,
        query: torch.Tensor,  # [T, heads, head_size], heads contiguous
        kv_cache: torch.Tensor,  # [2, blocks, kv_heads, block, head] contiguous
        out: torch.Tensor,  # [T, heads, head_size] contiguous
        q_starts: torch.Tensor,  # [n] int64: first query row of each sequence
        q_lens: torch.Tensor,  # [n] int64
        seq_lens: torch.Tensor,  # [n] int64, this step's tokens included
        block_tables: torch.Tensor,  # [n, max_blocks] int64 contiguous
        scale: float,
        window: int | None,
        soft_cap: float | None,
    ) -> None:
        _, num_blocks, kv_heads, block_size, head_size = kv_cache.shape
        check_kv_cache_dtype(kv_cache)
        rc = self._call(
            "pagedllm_paged_attention",
            query.data_ptr(),
            query.stride(0),
            kv_cache.data_ptr(),
            out.data_ptr(),
            q_starts.data_ptr(),
            q_lens.data_ptr(),
            seq_lens.data_ptr(),
            block_tables.data_ptr(),
            block_tables.shape[1],
            q_starts.shape[0],
            query.shape[1],
            kv_heads,
            num_blocks,
            block_size,
            head_size,
            scale,
            window or 0,
            soft_cap or 0.0,
            CURRENT_THREADS,
            kv_cache.dtype == torch.bfloat16,
        )
        if rc == -2:
            raise ValueError(
                f"paged attention takes at most 64 query heads per KV head, got {query.shape[1] // kv_heads}"
            )
        if rc == -3:
            raise ValueError(f"paged attention on a bf16 KV cache takes heads of at most 1024 features, got {head_size}")
        if rc != 0:
            raise MemoryError("paged attention could not allocate its scratch buffers")

    def dequantize(self, qtype: int, packed: torch.Tensor, k: int) -> torch.Tensor:
        """The packed rows as fp32 [rows, k], by the kernel's own dequantization (for tests)."""
        out = torch.empty((packed.shape[0], k), dtype=torch.float32)
        rc = self._call(
            "pagedllm_gguf_dequantize", qtype, packed.data_ptr(), packed.shape[0], k, out.data_ptr()
        )
        if rc != 0:
            raise ValueError(f"gguf_dequantize rejected type {qtype} with k={k} (code {rc})")
        return out


def wanted() -> str:
    """``auto``, ``0`` or ``1`` from PAGEDLLM_CPU_KERNELS; anything else is a readable error."""
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "0", "1"):
        raise ValueError(f"{KERNELS_ENV}={value!r}: expected auto, 0 or 1")
    return value


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pagedllm"


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise KernelUnavailable("no C compiler found (set CC or install gcc)")


def _compiler_id(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelUnavailable(f"{cc} --version failed: {exc}") from None
    return done.stdout.splitlines()[0] if done.stdout else cc


def build() -> Path:
    """Compile the library unless the cache already holds this source built by this compiler."""
    cc = _compiler()
    try:
        source = b"".join(p.read_bytes() for p in SOURCES)
    except OSError as exc:
        raise KernelUnavailable(f"kernel source missing from the installed package: {exc}") from None
    key = hashlib.sha256(source + _compiler_id(cc).encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KernelUnavailable(f"cannot create the kernel cache {target.parent}: {exc.strerror}") from None
    # Build beside the target and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *FLAGS, "-o", tmp, *map(str, SOURCES), "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise KernelUnavailable(f"{cc} failed to build the CPU kernels: {done.stderr.strip()[-400:]}")
        os.replace(tmp, target)
    except subprocess.TimeoutExpired:
        raise KernelUnavailable(f"{cc} took over 300 s to build the CPU kernels") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built the CPU kernels with %s: %s", cc, target)
    return target


@functools.cache
def load() -> CpuKernels:
    """The kernels, built and loaded once per process; KernelUnavailable says why not."""
    if wanted() == "0":
        raise KernelUnavailable(f"disabled by {KERNELS_ENV}=0")
    path = build()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelUnavailable(f"cannot load {path}: {exc}") from None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.pagedllm_gguf_linear.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, i64, ptr, ctypes.c_int]
    lib.pagedllm_gguf_linear.restype = ctypes.c_int
    lib.pagedllm_gguf_dequantize.argtypes = [ctypes.c_int, ptr, i64, i64, ptr]
    lib.pagedllm_gguf_dequantize.restype = ctypes.c_int
    lib.pagedllm_gguf_rows.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
    lib.pagedllm_gguf_rows.restype = ctypes.c_int
    f32, i32 = ctypes.c_float, ctypes.c_int
    lib.pagedllm_gguf_linear_int8.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, i64, ptr, ctypes.c_int]
    lib.pagedllm_gguf_linear_int8.restype = ctypes.c_int
    lib.pagedllm_gguf_int8_available.argtypes = []
    lib.pagedllm_gguf_int8_available.restype = ctypes.c_int
    lib.pagedllm_gguf_linear_amx.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, i64, ptr, ctypes.c_int]
    lib.pagedllm_gguf_linear_amx.restype = ctypes.c_int
    lib.pagedllm_argmax_rows.argtypes = [ptr, i64, i64, i64, ptr, ctypes.c_int]
    lib.pagedllm_argmax_rows.restype = ctypes.c_int
    lib.pagedllm_amx_tile_format.argtypes = [ctypes.c_int]
    lib.pagedllm_amx_tile_format.restype = ctypes.c_int
    lib.pagedllm_amx_tiles_bytes.argtypes = [ctypes.c_int, i64, i64]
    lib.pagedllm_amx_tiles_bytes.restype = i64
    lib.pagedllm_amx_pack.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ctypes.c_int, ptr, ctypes.c_int]
    lib.pagedllm_amx_pack.restype = ctypes.c_int
    lib.pagedllm_amx_linear_tiles.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, i64, ptr, ctypes.c_int]
    lib.pagedllm_amx_linear_tiles.restype = ctypes.c_int
    lib.pagedllm_amx_linear_tiles_silu.argtypes = [ptr, i64, i64, ptr, ptr, ctypes.c_int, i64, ptr, ctypes.c_int]
    lib.pagedllm_amx_linear_tiles_silu.restype = ctypes.c_int
    lib.pagedllm_gguf_amx_available.argtypes = []
    lib.pagedllm_gguf_amx_available.restype = ctypes.c_int
    lib.pagedllm_gguf_max_rows.argtypes = []
    lib.pagedllm_gguf_max_rows.restype = i32
    lib.pagedllm_kernel_isa.argtypes = []
    lib.pagedllm_kernel_isa.restype = ctypes.c_char_p
    lib.pagedllm_kernel_threads.argtypes = [i32]
    lib.pagedllm_kernel_threads.restype = i32
    lib.pagedllm_gemm_panel_width.argtypes = []
    lib.pagedllm_gemm_panel_width.restype = i32
    lib.pagedllm_gemm_pack.argtypes = [ptr, i64, i64, i64, ptr, i32]
    lib.pagedllm_gemm_pack.restype = i32
    lib.pagedllm_gemm.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64, i32]
    lib.pagedllm_gemm.restype = i32
    lib.pagedllm_rms_norm.argtypes = [ptr, i64, ptr, f32, ptr, i64, i64, i32]
    lib.pagedllm_rms_norm.restype = None
    lib.pagedllm_fused_add_rms_norm.argtypes = [ptr, ptr, ptr, f32, ptr, ptr, i64, i64, i32]
    lib.pagedllm_fused_add_rms_norm.restype = None
    lib.pagedllm_silu_and_mul.argtypes = [ptr, ptr, i64, i64, i32]
    lib.pagedllm_silu_and_mul.restype = None
    lib.pagedllm_apply_token_bitmask.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64]
    lib.pagedllm_apply_token_bitmask.restype = None
    lib.pagedllm_rotary.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, ptr, ptr, i64, i64, i32]
    lib.pagedllm_rotary.restype = ctypes.c_int
    lib.pagedllm_write_kv.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, i32]
    lib.pagedllm_write_kv.restype = None
    # q, q_stride, cache, out, q_starts, q_lens, seq_lens, block_tables, then the sizes
    lib.pagedllm_paged_attention.argtypes = [
        ptr,
        i64,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        *[i64] * 7,
        f32,
        i64,
        f32,
        i32,
        i32,
    ]
    lib.pagedllm_paged_attention.restype = ctypes.c_int
    return CpuKernels(
        lib,
        str(path),
        int(lib.pagedllm_gguf_max_rows()),
        lib.pagedllm_kernel_isa().decode(),
        bool(lib.pagedllm_gguf_int8_available()),
        bool(lib.pagedllm_gguf_amx_available()),
    )


@functools.cache
def status() -> tuple[CpuKernels | None, str]:
    """(kernels or None, a one-line description for ``pagedllm env``); decided once per process."""
    try:
        kernels = load()
    except KernelUnavailable as exc:
        return None, f"not used: {exc}"
    types = "/".join(TYPE_NAMES[t] for t in sorted(TYPE_NAMES))
    if kernels.gguf_max_rows > 0:
        rows = "row" if kernels.gguf_max_rows == 1 else "rows"
        gguf = (
            f"and GGUF {types} matmuls and embeddings on the blocks (every step when a layer keeps only "
            f"its blocks; up to {kernels.gguf_max_rows} token {rows} beside a dense weight)"
        )
    else:
        gguf = (
            f"and GGUF {types} matmuls and embeddings on the blocks when a layer keeps only its blocks "
            f"(slower than fp32 in this build: beside a dense weight the dense one is used)"
        )
    return kernels, (
        f"used ({kernels.isa} build) for fp32 matmuls (weights pre-packed), norms, rotary, SiLU, KV writes, "
        f"paged attention {gguf} ({kernels.path})"
    )


def reset() -> None:
    """Forget the loaded kernels and the status (tests that change the environment call this)."""
    load.cache_clear()
    status.cache_clear()
