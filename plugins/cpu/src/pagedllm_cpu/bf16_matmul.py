"""bf16 batched matmuls for steps with many token rows, through oneDNN (AMX tiles or AVX-512 BF16).

Why: a step of many token rows (prefill, large decode batches) is compute-bound, and CPUs with
AMX multiply bf16 tiles 3-7x faster than fp32 FMAs (oneDNN on an AMX Xeon: 925 vs 246 GFLOP/s at
64 rows, 2172 vs 325 at 512). Decode-sized steps are bound by reading the weights and stay on the
fp32 panels / GGUF block kernels (ops.py).

What it computes: x rounded to bf16 times a bf16 copy of the weight, accumulated in fp32 by oneDNN
(``torch.mm`` on bf16 CPU tensors), then rounded to bf16 once more (torch's CPU matmul writes its
output in the input dtype; there is no fp32-output bf16 matmul on CPU) and widened to fp32; the
bias is added in fp32. Error per output: about 2^-8 of sum |x_i w_i| from the input roundings
plus 2^-9 of |y| from the output rounding (tests/test_bf16_matmul.py checks this bound).

Routing, decided by measurement: for each weight shape (N, K) and row-count bucket (``BUCKETS``:
16-63, 64-255, 256+ rows; fewer than 16 rows never route) the first step that needs it times this
path against the fp32 path (what ``packed_linear`` would do otherwise) at the bucket's lower row
count, alternating rounds, and routes the bucket to bf16 only if it was at least ``MARGIN`` faster.
The decision is recorded, logged and never revisited in the process, so within a run a token
row's numerics depend only on its step's row-count bucket: rows of steps in a bucket routed to
bf16 get bf16 numerics, all others fp32. Inside the bf16 path a row's result does not depend on
its batch mates or the thread count (oneDNN does not split K here; the tests check both).

The switch, ``PAGEDLLM_CPU_BF16_GEMM``:
- unset: ``auto`` when the model's dtype is left to the platform (``--dtype auto``, the default),
  ``off`` when the user asks for ``--dtype float32`` (``default_for_dtype``). On an AMX host this
  keeps greedy parity with transformers under the conformance suite's top-k containment rule
  (measured: 64 prompts x 32 tokens, 54 identical, 10 near-tie divergences, no violation;
  tests/test_bf16_matmul.py checks 16 prompts), but moves logprobs past the suite's fp32
  tolerance, which is why an explicit float32 request gets fp32 arithmetic;
- ``off``: never;
- ``auto``: measured routing on CPUs with AMX (cpuinfo ``amx_bf16`` and ``amx_tile``), off elsewhere;
- ``on``: measured routing on any CPU where oneDNN has native bf16 (AMX or AVX-512 BF16);
- ``all``: every step of 16+ rows in bf16, no measurement (numerics checks, tests).

Kernels: on AMX hosts pagedllm's own kernel (kernels/gguf_linear.c, ``own_amx``): at each step it
packs bf16 tiles from the layer's GGUF blocks (dequantized exactly first) or from its fp32 rows, so
by default it keeps no bf16 copy, stores fp32 sums (no bf16 output rounding) and is batch- and
thread-invariant. Elsewhere (AVX-512 BF16, or a width that is not whole 32-chunks) oneDNN through
``torch.mm`` on one bf16 copy per routed weight (half its fp32 size), made at its first routed
step from the dense weight or the GGUF blocks; ``copy_bytes()`` counts them; ``pagedllm env`` and
the log report it. oneDNN's AMX kernels were measured not to be batch-invariant, which is one
reason AMX hosts do not use them.

Memory for speed, ``PAGEDLLM_CPU_AMX_TILES`` (``auto``, the default, ``on``, ``compact`` or ``off``):
kept tiles are each routed layer's packed tiles (packed at its first routed step; ``pagedllm env`` and
``tiles_bytes()`` count them), multiplied from instead of packing at every step. The products are the
same bit for bit. At 64 rows the packing is about half of the kernel's time, so kept tiles run 1.3-2x
faster (Intel Xeon with AMX, 2 threads, weights read from memory). Two forms: bf16 tiles (2 bytes a
weight), and a quantized weight's compact tiles (gguf_linear.c, "Compact kept tiles": its integers in
the tiles' order and fp32 scales, 0.75 bytes a weight for Q4_0 / Q4_1 / Q4_K, 1.25 for Q8_0 / Q5_K,
1.5 for Q6_K), expanded into the same bf16 tiles panel by panel at each step; a decode step ran as
fast on either (default model, 64 sequences: 26-29 ms a captured step both; ``bench_gguf_kernels.py
--tiles``: within about 10% either way) for the 4-bit formats; the 8-bit ones save less and ran
slower (``AUTO_COMPACT_TYPES``). ``auto`` keeps tiles only for a small model, compact for its 4-bit
layers (the default model 130 MiB instead of 257): when two bytes for every weight
of the model come to at most ``AUTO_TILES_MAX_BYTES`` and a sixteenth of the host's memory (the default
135M model; a 1B model's Q4_K_M file would need about 1 GB more even compact, so it keeps none); the
platform decides once the model is loaded (``decide_auto_tiles``). ``on`` keeps bf16 tiles for any
model, ``compact`` compact ones for any model (dense weights' in bf16), ``off`` never.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from pagedllm.plugin import PackedWeight
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

from pagedllm_cpu.env_default import EnvDefault
from pagedllm_cpu.kernels import clib

logger = logging.getLogger(__name__)

GEMM_ENV = "PAGEDLLM_CPU_BF16_GEMM"
MODES = ("auto", "on", "all", "off")
BUCKETS = (16, 64, 256)  # lower bounds of the row-count buckets; fewer rows than BUCKETS[0] never route
MARGIN = 0.9  # bf16 must take at most this fraction of the fp32 time: fp32 numerics win ties
# Alternating timing rounds per decision (the best of each side is compared): at least
# MIN_ROUNDS, then more until TIME_BUDGET seconds are spent (or MAX_ROUNDS), so one round lost to
# another process's time slice does not decide.
MIN_ROUNDS, MAX_ROUNDS, TIME_BUDGET = 5, 40, 0.3

# The default model's (SmolLM2-135M) layer shapes, [out, in]: what ``pagedllm env`` measures
# when no model is loaded.
DEFAULT_MODEL_SHAPES = {
    "qkv_proj": (960, 576),
    "o_proj": (576, 576),
    "gate_up_proj": (3072, 576),
    "down_proj": (576, 1536),
    "lm_head": (49152, 576),
}

FP32 = "fp32"
BF16 = "bf16"


_default = EnvDefault(GEMM_ENV)

# Memory for speed on the own AMX kernel: kept tiles are each routed layer's B tiles (bf16, or a
# quantized weight's compact form), packed at its first routed step instead of at every step.
TILES_ENV = "PAGEDLLM_CPU_AMX_TILES"
TILES_MODES = ("auto", "on", "compact", "off")
# ``auto`` keeps tiles for a model whose weights at 2 bytes each take at most this (and a sixteenth of
# the host's memory): small models, where the copy is cheap and the batched steps gain most.
AUTO_TILES_MAX_BYTES = 512 * 2**20


def default_for_dtype(dtype_auto: bool) -> None:
    """The switch when the user left it unset, from the engine's dtype request (CpuPlatform's
    check_and_update_config): ``--dtype auto`` (the default) -> ``auto`` (bf16 batched steps on AMX
    hosts, measured per shape), an explicit ``--dtype float32`` -> ``off`` (fp32 arithmetic
    everywhere). A value the user set always wins (env_default.py)."""
    _default.apply("auto" if dtype_auto else None)
    _enabled.clear()


def mode() -> str:
    raw = os.environ.get(GEMM_ENV, "off").strip().lower() or "off"
    if raw not in MODES:
        raise ValueError(f"{GEMM_ENV}={raw!r}: expected one of {', '.join(MODES)}")
    return raw


def _flags() -> frozenset[str]:
    from pagedllm_cpu.platform import cpu_info  # platform.py imports ops.py, which imports us

    return cpu_info().flags


def isa() -> str | None:
    """The bf16 units oneDNN would use here: 'AMX', 'AVX-512 BF16', or None (bf16 emulated: slow)."""
    if not torch.backends.mkldnn.is_available():
        return None
    flags = _flags()
    if {"amx_bf16", "amx_tile"} <= flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16"
    return None


def status() -> tuple[bool, str]:
    """Whether steps may route to bf16 here, and why (flags found, the switch)."""
    wanted = mode()
    units = isa()
    found = f"{units} found" if units else "no AMX or AVX-512 BF16 found (cpuinfo), or torch without oneDNN"
    if wanted == "off":
        why = "unset with no engine configured: auto with --dtype auto, off with --dtype float32" if GEMM_ENV not in os.environ else "off"
        return False, f"{GEMM_ENV}={why} ({found})"
    if units is None:
        return False, f"{GEMM_ENV}={wanted} but {found}: bf16 would be emulated, slower than fp32"
    if wanted == "auto" and units != "AMX":
        return False, f"{GEMM_ENV}=auto uses it only with AMX; {found} (set {GEMM_ENV}=on to measure and use it)"
    how = "every step of 16+ rows" if wanted == "all" else "where measured faster"
    return True, f"{GEMM_ENV}={wanted}, {found}: {_engine()} {how}"


def _engine() -> str:
    """What multiplies the routed steps here: the own AMX kernel where the kernels have it, else oneDNN."""
    kernels, _ = clib.status()
    if kernels is None or not kernels.amx_bf16:
        return "oneDNN bf16"
    kept = f"tiles kept, {TILES_ENV}={tiles_mode()}" if keep_tiles() else "no copy"
    return f"bf16 AMX tiles (own kernel, {kept}; oneDNN for widths not whole 32-chunks)"


_enabled: dict[str, bool] = {}  # mode -> status()[0], cached: routes() asks on every many-row step


def enabled() -> bool:
    wanted = mode()
    if wanted not in _enabled:
        _enabled[wanted] = status()[0]
    return _enabled[wanted]


def bucket(rows: int) -> int | None:
    """The lower bound of ``rows``' bucket, None below the first."""
    found = None
    for low in BUCKETS:
        if rows >= low:
            found = low
    return found


@dataclass(frozen=True, slots=True)
class Decision:
    path: str  # FP32 or BF16
    fp32_gflops: float | None  # measured, None when not measured (mode 'all')
    bf16_gflops: float | None
    own_amx: bool = False  # pagedllm's AMX kernel, from the GGUF blocks or the fp32 weight (no bf16 copy)

    def describe(self) -> str:
        if self.path != BF16:
            name = "fp32"
        elif self.own_amx:
            name = "bf16 AMX tiles (own kernel, " + ("tiles kept)" if keep_tiles() else "no copy)")
        else:
            name = f"bf16 oneDNN {isa()}"
        if self.fp32_gflops is None:
            return f"{name} ({GEMM_ENV}=all)"
        return f"{name} (measured bf16 {self.bf16_gflops:.0f} vs fp32 {self.fp32_gflops:.0f} GFLOP/s)"


# (N, K, bucket) -> Decision, made once per process.
_decisions: dict[tuple[int, int, int], Decision] = {}
_lock = threading.Lock()
_bypass = threading.local()  # set while timing the fp32 path through packed_linear itself

# blocks or dense weight -> (its version when packed, its AMX tiles); held weakly like the copies.
_tiles: WeakIdKeyDictionary = WeakIdKeyDictionary()
_tiles_bytes = 0


def tiles_mode() -> str:
    raw = os.environ.get(TILES_ENV, "auto").strip().lower() or "auto"
    if raw not in TILES_MODES:
        raise ValueError(f"{TILES_ENV}={raw!r}: expected one of {', '.join(TILES_MODES)}")
    return raw


# ``auto``'s decision for the loaded model: (keep, why), None before a model is loaded.
_auto_tiles: tuple[bool, str] | None = None


def decide_auto_tiles(model: torch.nn.Module, total_memory: int) -> tuple[bool, str]:
    """``auto``'s choice for ``model`` (called by the platform once it is loaded): keep the tiles when
    two bytes for each of its matrix weights (an upper bound on what the routed layers would keep)
    come to at most AUTO_TILES_MAX_BYTES and a sixteenth of ``total_memory``."""
    global _auto_tiles
    weights = sum(p.shape[0] * p.shape[1] for p in model.parameters() if p.dim() == 2)
    need, limit = 2 * weights, min(AUTO_TILES_MAX_BYTES, total_memory // 16)
    keep = need <= limit
    verdict = "kept" if keep else "not kept"
    _auto_tiles = (keep, f"{verdict}: the model's {weights / 1e6:.0f}M weights need at most {need / 2**20:.0f} MiB of tiles, "
                         f"the limit is {limit / 2**20:.0f} MiB")
    return _auto_tiles


# Formats whose compact tiles ``auto`` keeps: the 4-bit ones (0.75 bytes a weight, a decode step as
# fast as on bf16 tiles). The 8-bit ones save less (1.25-1.5 bytes a weight) and ran 10-30% slower
# when a panel was expanded before its products (the Q8_0 LM head 49152x576 at 64 rows); expanded
# during them (gguf_linear.c, amx_block_expanding) Q8_0 runs 0.93-1.05x bf16 tiles' speed, so keeping
# them bf16 now only spends memory a small model can spare. ``compact`` keeps every format compact.
AUTO_COMPACT_TYPES = frozenset({2, 3, 12})  # Q4_0, Q4_1, Q4_K


def compact_tiles(qtype: int | None = None) -> bool:
    """Whether a quantized weight's kept tiles take its type's compact format: ``compact``; ``auto`` for
    the 4-bit formats (``AUTO_COMPACT_TYPES``; qtype None: for any of them)."""
    wanted = tiles_mode()
    return wanted == "compact" or (wanted == "auto" and (qtype is None or qtype in AUTO_COMPACT_TYPES))


def keep_tiles() -> bool:
    """Whether the own AMX kernel keeps its packed tiles: ``on``, or ``auto`` for a small model."""
    wanted = tiles_mode()
    if wanted == "auto":
        return _auto_tiles is not None and _auto_tiles[0]
    return wanted in ("on", "compact")


def tiles_bytes() -> int:
    """Bytes held by the AMX tiles kept so far (freed weights still counted)."""
    return _tiles_bytes


def amx_tiles(kernels: clib.CpuKernels, key: torch.Tensor, qtype: int, rows: torch.Tensor, n: int) -> clib.AmxTiles | None:
    """The kept AMX tiles of the weight ``rows`` (GGUF blocks of ``qtype`` in the type's compact
    format, or a dense weight's bytes as GGML_F32 in bf16 tiles), packed on first use, or None when
    tiles are not kept (``keep_tiles``)."""
    global _tiles_bytes
    if not keep_tiles():
        return None
    entry = _tiles.get(key)
    if entry is None or entry[0] != _version(key):
        with _outside_capture():
            tiles = kernels.amx_pack(qtype, rows, n, compact=compact_tiles(qtype))
        if entry is None:
            _tiles_bytes += tiles.nbytes()
            logger.debug("AMX tiles of a %dx%d weight kept; %.1f MiB of tiles", n, rows.shape[1], _tiles_bytes / 2**20)
        entry = (_version(key), tiles)
        _tiles[key] = entry
    return entry[1]


# weight -> (its version when copied, bf16 [N, K]); held weakly like ops.py's panels.
_copies: WeakIdKeyDictionary = WeakIdKeyDictionary()
_copy_bytes = 0


def copy_bytes() -> int:
    """Bytes held by the bf16 weight copies made so far (freed weights still counted)."""
    return _copy_bytes


def decisions() -> dict[tuple[int, int, int], Decision]:
    return dict(_decisions)


def reset() -> None:
    """Forget every decision (tests; a changed switch), the kept-tiles choice for a model included."""
    global _auto_tiles
    with _lock:
        _decisions.clear()
        _enabled.clear()
        _auto_tiles = None


@contextlib.contextmanager
def _outside_capture() -> Iterator[None]:
    """Run setup work (timing, weight copies) unseen by a decode capture in progress (capture.py)."""
    recording = clib._recording
    clib._recording = None
    try:
        with _disable_current_modes():
            yield
    finally:
        clib._recording = recording


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors keep no version counter
        return None


def _dequantize(packed: PackedWeight) -> torch.Tensor:
    """The fp32 [N, K] weight from its GGUF blocks."""
    try:
        from pagedllm.plugin import dequantize  # type: ignore[attr-defined]
    except ImportError:
        dequantize = None
    if dequantize is not None:
        return dequantize(packed)
    import gguf
    import numpy as np

    rows = gguf.quants.dequantize(packed.data.numpy(), gguf.GGMLQuantizationType(packed.ggml_type))
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).view(packed.out_features, -1)


def bf16_weight(weight: torch.Tensor, packed: PackedWeight | None) -> torch.Tensor:
    """``weight`` as bf16 [N, K], made on first use (from the blocks when it is on the meta device)."""
    global _copy_bytes
    entry = _copies.get(weight)
    if entry is None or entry[0] != _version(weight):
        with torch.no_grad():
            if weight.device.type == "meta":
                if packed is None:
                    raise ValueError("bf16 matmul: the weight is on the meta device and no GGUF blocks were given")
                dense = _dequantize(packed)
            else:
                dense = weight.detach()
            copy = dense.to(torch.bfloat16).contiguous()
        if entry is None:
            _copy_bytes += copy.numel() * copy.element_size()
            logger.debug("bf16 copy of a %dx%d weight; %.1f MiB of bf16 copies", *copy.shape, _copy_bytes / 2**20)
        entry = (_version(weight), copy)
        _copies[weight] = entry
    return entry[1]


def bf16_linear(x: torch.Tensor, weight_bf16: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] fp32 -> bf16, times weight_bf16 [N, K]^T through oneDNN, -> fp32 [M, N] (+ bias in fp32).

    Written with in-place copies and ``mm`` so a decode capture can replay it (capture.py)."""
    xb = torch.empty(x.shape, dtype=torch.bfloat16)
    xb.copy_(x)
    yb = torch.mm(xb, weight_bf16.t())
    y = torch.empty(yb.shape, dtype=torch.float32)
    y.copy_(yb)
    if bias is not None:
        y.add_(bias)
    return y


def _best_of(fn: Callable[[], object], other: Callable[[], object]) -> tuple[float, float]:
    """Best wall time of ``fn`` and of ``other`` over alternating rounds (after a warm-up)."""
    fn(), other()
    best = [float("inf"), float("inf")]
    start_all = time.perf_counter()
    for rounds in range(MAX_ROUNDS):
        if rounds >= MIN_ROUNDS and time.perf_counter() - start_all > TIME_BUDGET:
            break
        for i, f in enumerate((fn, other)):
            start = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def measure(
    weight: torch.Tensor,
    packed: PackedWeight | None,
    bias: torch.Tensor | None,
    rows: int,
    fp32: Callable[..., torch.Tensor],
) -> Decision:
    """Time bf16_linear against ``fp32(x, weight, bias, packed)`` at ``rows`` token rows."""
    n, k = weight.shape
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(0))
    own = own_amx(weight, packed)
    if own:
        def bf16() -> torch.Tensor:
            return _own_amx_linear(x, weight, bias, packed)
    else:
        wb = bf16_weight(weight, packed)

        def bf16() -> torch.Tensor:
            return bf16_linear(x, wb, bias)
    _bypass.active = True
    try:
        t_fp32, t_bf16 = _best_of(lambda: fp32(x, weight, bias, packed), bf16)
    finally:
        _bypass.active = False
    flops = 2.0 * rows * n * k
    path = BF16 if t_bf16 <= MARGIN * t_fp32 else FP32
    return Decision(path, flops / t_fp32 / 1e9, flops / t_bf16 / 1e9, own)


def routes(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: PackedWeight | None,
    fp32: Callable[..., torch.Tensor],
) -> bool:
    """Whether this step's matmul runs in bf16; decides (and records) its shape's bucket on first sight."""
    rows = x.shape[0] if x.dim() == 2 else 0
    low = bucket(rows)
    if low is None or getattr(_bypass, "active", False):
        return False
    if (
        x.dtype != torch.float32
        or x.device.type != "cpu"
        or x.requires_grad
        or weight.dtype != torch.float32
        or weight.dim() != 2
        or weight.shape[1] != x.shape[1]
        or 0 in weight.shape
        or (bias is not None and (bias.dtype != torch.float32 or bias.shape != (weight.shape[0],)))
    ):
        return False
    key = (weight.shape[0], weight.shape[1], low)
    decision = _decisions.get(key)
    if decision is None:
        if not enabled():
            return False
        with _lock, _outside_capture():
            decision = _decisions.get(key)
            if decision is None:
                decision = (
                    Decision(BF16, None, None, own_amx(weight, packed))
                    if mode() == "all"
                    else measure(weight, packed, bias, low, fp32)
                )
                if decision.path == BF16 and not decision.own_amx:
                    bf16_weight(weight, packed)
                _decisions[key] = decision
                logger.info(
                    "cpu matmul %dx%d at %s rows: %s; bf16 weight copies %.1f MiB",
                    key[0],
                    key[1],
                    _bucket_name(low),
                    decision.describe(),
                    _copy_bytes / 2**20,
                )
    if decision.path != BF16:
        return False
    if own_amx(weight, packed):
        return True
    if _copies.get(weight) is None:  # another layer of the same shape: its copy, made outside a capture
        with _outside_capture():
            bf16_weight(weight, packed)
    return True


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedWeight | None
) -> torch.Tensor:
    """The routed step's matmul (call after ``routes`` said yes)."""
    if own_amx(weight, packed):
        return _own_amx_linear(x, weight, bias, packed)
    return bf16_linear(x, bf16_weight(weight, packed), None if bias is None else bias.contiguous())


def own_amx(weight: torch.Tensor, packed: PackedWeight | None) -> bool:
    """Whether a bf16 step of this layer runs on pagedllm's AMX kernel (kernels/gguf_linear.c) instead
    of oneDNN: the kernels were built with AMX and the OS grants tile data, and the layer keeps only
    GGUF blocks of formats the kernel takes, or a dense contiguous fp32 weight whose width is whole
    32-chunks. The kernel packs bf16 tiles from the blocks or the fp32 rows at every step, so no bf16
    copy is kept (unless its tiles are: ``keep_tiles``, ``amx_tiles``), and unlike oneDNN's AMX kernels (measured here) a row's result does not depend
    on its batch mates."""
    kernels, _ = clib.status()
    if kernels is None or not kernels.amx_bf16:
        return False
    if weight.device.type == "meta":
        runs = () if packed is None else getattr(packed, "parts", ()) or (packed,)
        return bool(runs) and all(p.ggml_type in clib.TYPE_SIZES for p in runs)
    return weight.dtype == torch.float32 and weight.dim() == 2 and weight.is_contiguous() and weight.shape[1] % 32 == 0


def _dense_tiles(kernels: clib.CpuKernels, weight: torch.Tensor) -> clib.AmxTiles | None:
    """A dense fp32 weight's kept tiles (its rows' bytes packed as GGML_F32), or None when not kept."""
    return amx_tiles(kernels, weight, clib.GGML_F32, weight.view(torch.uint8), weight.shape[0])


def silu_tiles(weight: torch.Tensor, packed: PackedWeight | None) -> tuple[clib.AmxTiles, clib.AmxTiles] | None:
    """The kept tiles of a fused [gate; up] layer's two halves, for the AMX kernel's fused SiLU
    (``amx_tiles_linear_silu``), or None where that kernel does not apply: tiles not kept, not the own
    AMX kernel, halves that are not whole 32-row panels, or blocks split into parts other than gate / up."""
    kernels, _ = clib.status()
    n = weight.shape[0]
    if kernels is None or not keep_tiles() or n % 64 or not own_amx(weight, packed):
        return None
    d = n // 2
    if weight.device.type != "meta":
        tiles = _dense_tiles(kernels, weight)
    else:
        runs = getattr(packed, "parts", ()) or (packed,)
        if len(runs) == 2 and runs[0].out_features == d:
            gate, up = (amx_tiles(kernels, p.data, p.ggml_type, p.data, d) for p in runs)
            return (gate, up) if gate is not None and up is not None else None
        if len(runs) != 1:
            return None
        tiles = amx_tiles(kernels, runs[0].data, runs[0].ggml_type, runs[0].data, n)
    if tiles is None:
        return None
    half = tiles.nbytes() // 2  # whole panels: the gate's, then the up projection's
    return clib.AmxTiles(tiles.data[:half], tiles.fmt), clib.AmxTiles(tiles.data[half:], tiles.fmt)


def _own_amx_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedWeight | None
) -> torch.Tensor:
    if weight.device.type == "meta":
        from pagedllm_cpu.ops import blocks_linear  # ops imports this module

        return blocks_linear(x, weight, bias, packed, amx=True)
    kernels, _ = clib.status()
    tiles = _dense_tiles(kernels, weight)
    x = x.contiguous()
    y = kernels.amx_dense(x, weight) if tiles is None else kernels.amx_tiles_linear(x, tiles, weight.shape[0])
    return y.add_(bias) if bias is not None else y


def _bucket_name(low: int) -> str:
    i = BUCKETS.index(low)
    return f"{low}-{BUCKETS[i + 1] - 1}" if i + 1 < len(BUCKETS) else f"{low}+"


def describe(fp32_path: Callable[..., torch.Tensor] | None = None) -> str:
    """The matmul paths for ``pagedllm env``: the switch, the flags, and the decisions made.

    With no decision made yet (no model ran) and routing enabled, measures the default model's
    layer shapes (random weights) through ``fp32_path``, so the report says what a run would do."""
    on, why = status()
    small = f"steps of < {BUCKETS[0]} rows: GGUF blocks or fp32 panels (decode is memory-bound)"
    if not on:
        return f"{small}; larger steps: fp32 panels — bf16 path off: {why}"
    units = isa()
    lines = [f"{small}; larger steps: {_engine()} ({units}) or fp32 panels per shape and row bucket — {why}"]
    if not _decisions and fp32_path is not None:
        generator = torch.Generator().manual_seed(0)
        for name, (n, k) in DEFAULT_MODEL_SHAPES.items():
            weight = torch.randn(n, k, generator=generator) * 0.02
            for low in BUCKETS:
                x = torch.empty(low, k)
                routes(x, weight, None, None, fp32_path)
            lines.append(f"  default model {name} {n}x{k}: " + _shape_line(n, k))
        lines.append(f"  (measured on random weights of those shapes; bf16 copies made for it: {_copy_bytes / 2**20:.1f} MiB)")
        if _engine() != "oneDNN bf16":
            lines.append(f"  {_tiles_line()}")
        return "\n".join(lines)
    for n, k in sorted({(n, k) for n, k, _ in _decisions}):
        lines.append(f"  {n}x{k}: " + _shape_line(n, k))
    tiles = f"; {_tiles_line()}" if _engine() != "oneDNN bf16" else ""
    lines.append(f"  bf16 weight copies: {_copy_bytes / 2**20:.1f} MiB{tiles}")
    return "\n".join(lines)


def _tiles_line() -> str:
    wanted = tiles_mode()
    why = f"; {_auto_tiles[1]}" if wanted == "auto" and _auto_tiles is not None else ""
    if keep_tiles():
        form = {"compact": "compact for quantized weights", "auto": "compact for 4-bit formats"}.get(wanted, "bf16")
        return f"AMX tiles kept, {form} ({TILES_ENV}={wanted}{why}): {_tiles_bytes / 2**20:.1f} MiB"
    if wanted == "auto" and _auto_tiles is None:
        return (f"AMX tiles ({TILES_ENV}=auto): kept once a model is loaded if 2 bytes a weight take at most "
                f"{AUTO_TILES_MAX_BYTES / 2**20:.0f} MiB and 1/16 of memory; on keeps them for any model, off never")
    return (f"AMX tiles packed at each step ({TILES_ENV}={wanted}{why}; on keeps them, 2 bytes a weight; "
            "compact keeps a quantized weight's in 0.75-1.5)")


def _shape_line(n: int, k: int) -> str:
    parts = []
    for low in BUCKETS:
        decision = _decisions.get((n, k, low))
        if decision is not None:
            parts.append(f"{_bucket_name(low)} rows {decision.describe()}")
    return "; ".join(parts) or "no step of 16+ rows yet"
