"""The CPU platform: host memory, threads, dtype and KV budget rules, and the CPU attention backend.

Environment variables (read when the engine configures the platform):
- ``PAGEDLLM_CPU_KV_CACHE_SPACE``: KV cache size in GiB (like vLLM's VLLM_CPU_KVCACHE_SPACE);
  ``--kv-cache-memory`` wins over it; without either the cache takes 4 GiB, at most half of the
  free memory.
- ``PAGEDLLM_CPU_THREADS``: torch and C-kernel threads; default: the physical cores this process
  may run on, divided among tensor-parallel ranks, lowered between steps while other processes
  keep some of those cores busy (contention.py; single-rank engines). Applied in
  ``check_and_update_config`` (the process that configures the engine) and again in
  ``set_device`` (each worker process); set, it fixes the count.
- ``PAGEDLLM_CPU_CAPTURE``: ``lazy`` (default: capture a decode batch size on the first step that
  needs it) or ``startup`` (capture every size before serving); see capture.py.
- ``PAGEDLLM_CPU_IPEX``: ``auto`` (default: use IPEX's paged attention when it is installed for
  this torch), ``0`` (never), ``1`` (required: fail if it cannot be used). With the C kernels,
  fp32 attention runs in C (faster, and decode steps can be captured); IPEX takes the other dtypes.
- ``PAGEDLLM_CPU_BF16_GEMM``: ``auto``, ``on``, ``all`` or ``off``; unset: ``auto`` with ``--dtype
  auto`` (the default), ``off`` with an explicit ``--dtype float32``. Steps of 16+ token rows
  multiply in bf16 where measured faster: on AMX tiles through an own kernel (no weight copy), or
  through oneDNN on CPUs with AVX-512 BF16 only (``on``) (bf16_matmul.py).
- ``PAGEDLLM_CPU_AMX_TILES``: ``auto`` (default), ``on``, ``compact`` or ``off``: the AMX kernel keeps
  each routed layer's packed tiles instead of packing them at every step: bf16 (2 bytes a weight,
  ``on``) or a quantized layer's compact form (0.75-1.5 bytes a weight, ``compact``); ``auto`` keeps
  compact ones for a small model only (at most 512 MiB at 2 bytes a weight), decided once it is
  loaded (bf16_matmul.py).
- ``--kv-cache-dtype auto`` keeps an fp32 model's KV cache in bf16 where the batched steps multiply in
  bf16 on AMX tiles by default (``--dtype auto``, ``PAGEDLLM_CPU_BF16_GEMM`` unset or ``auto``);
  ``--kv-cache-dtype float32`` keeps fp32 (``_auto_kv_cache_dtype``).
- ``PAGEDLLM_CPU_MALLOC``: ``auto`` (default) or ``off``: glibc's heap keeps a step's activation blocks
  between steps instead of mapping and faulting them in again (malloc.py).
- ``PAGEDLLM_CPU_INT8_DOT``: ``off``, ``decode`` or ``on``; unset: ``decode`` with ``--dtype auto``
  (where the build has VNNI), ``off`` with ``--dtype float32``. Layers kept as GGUF blocks multiply
  steps of fewer than 16 rows (``decode``) or every step (``on``) with int8-quantized activations and
  VNNI integer dot products (kernels/gguf_int8.c; ops.py).
"""

from __future__ import annotations

import functools
import logging
import os
import platform as py_platform
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pagedllm.plugin import AttentionSpec, Platform, host_available_memory, host_total_memory

from pagedllm_cpu import bf16_matmul
from pagedllm_cpu import malloc as cpu_malloc
from pagedllm_cpu.attention import CpuAttentionBackend
from pagedllm_cpu.communicator import CpuCommunicator
from pagedllm_cpu.contention import AdaptiveThreads, load_note
from pagedllm_cpu.kernels import clib
from pagedllm_cpu.kernels import ipex as ipex_kernels

try:
    from pagedllm.plugin import ConfigError
except ImportError:  # pragma: no cover - older plugin API
    ConfigError = ValueError  # type: ignore[misc,assignment]

if TYPE_CHECKING:
    from pagedllm.plugin import EngineConfig

logger = logging.getLogger(__name__)

GiB = 1 << 30
KV_SPACE_ENV = "PAGEDLLM_CPU_KV_CACHE_SPACE"
THREADS_ENV = "PAGEDLLM_CPU_THREADS"
DEFAULT_KV_CACHE_BYTES = 4 * GiB


@dataclass(frozen=True, slots=True)
class CpuInfo:
    """What /proc/cpuinfo says about this CPU (portable fallbacks elsewhere)."""

    model_name: str
    arch: str
    flags: frozenset[str]
    physical_cores: int  # among the CPUs this process may run on

    @property
    def native_bf16(self) -> bool:
        return bool(self.flags & {"avx512_bf16", "amx_bf16"})

    @property
    def isa(self) -> str:
        """The widest vector ISA, e.g. 'AVX-512, AMX' or 'AVX2'."""
        parts = []
        if "avx512f" in self.flags:
            parts.append("AVX-512" + (" BF16" if "avx512_bf16" in self.flags else ""))
        elif "avx2" in self.flags:
            parts.append("AVX2")
        if "amx_tile" in self.flags:
            parts.append("AMX")
        if {"asimd", "sve"} & self.flags:
            parts.append("SVE" if "sve" in self.flags else "NEON")
        return ", ".join(parts) or "no SIMD flags found"


@functools.cache
def cpu_info() -> CpuInfo:
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    model, flags, cores = "", frozenset(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        text = ""
    for record in text.split("\n\n"):
        fields = {}
        for line in record.splitlines():
            name, _, value = line.partition(":")
            fields[name.strip()] = value.strip()
        if "processor" not in fields:
            continue
        model = model or fields.get("model name", "")
        flags = flags or frozenset((fields.get("flags") or fields.get("Features", "")).split())
        if int(fields["processor"]) in allowed:
            cores.add((fields.get("physical id", "0"), fields.get("core id", fields["processor"])))
    return CpuInfo(
        model_name=model or py_platform.processor() or "unknown CPU",
        arch=py_platform.machine() or "unknown",
        flags=flags,
        physical_cores=len(cores) or len(allowed) or 1,
    )


def _verified_on() -> str:
    info = cpu_info()
    status = ipex_kernels.ipex_status()
    ipex = f"IPEX {status.version} paged attention" if status.usable else ""
    if clib.status()[0] is not None:
        kernels = "pagedllm C kernels (host compiler) + torch" + (f"; {ipex} for bf16/fp16" if ipex else "")
    else:
        kernels = ipex or "torch-native kernels"
    return f"{info.arch} CPU ({info.isa}), {kernels}"


def kv_space_from_env() -> int | None:
    """Bytes from PAGEDLLM_CPU_KV_CACHE_SPACE (GiB), None when unset; a bad value is a ConfigError."""
    raw = os.environ.get(KV_SPACE_ENV, "").strip()
    if not raw:
        return None
    try:
        gib = float(raw)
    except ValueError:
        gib = float("nan")
    if not gib > 0 or gib == float("inf"):
        raise ConfigError(f"{KV_SPACE_ENV}={raw!r} is not a positive number of GiB; set it to e.g. 4 or 0.5")
    return int(gib * GiB)


def threads_from_env(tp_size: int = 1) -> int:
    """PAGEDLLM_CPU_THREADS, else the physical cores shared among tensor-parallel ranks."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return max(1, cpu_info().physical_cores // max(1, tp_size))
    try:
        threads = int(raw)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ConfigError(f"{THREADS_ENV}={raw!r} is not a positive whole number of threads")
    return threads


def _amx_bf16_steps(kernels: Any) -> bool:
    """Whether batched steps multiply in bf16 on AMX tiles here: the kernels' own AMX kernel, an AMX CPU
    and the bf16 switch on (the condition for a bf16 KV cache under --kv-cache-dtype auto)."""
    return kernels is not None and kernels.amx_bf16 and bf16_matmul.isa() == "AMX" and bf16_matmul.enabled()


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    priority = 10
    supported_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    verified_on = _verified_on()

    def __init__(self) -> None:
        self._threads: int | None = None
        self._ipex: Any = None  # the loaded IpexKernels, once selected
        self.decode_graphs: Any = None  # CpuDecodeGraphs, once compile_or_capture ran
        self.adaptive: AdaptiveThreads | None = None  # the thread count's contention monitor, while serving

    # --- identity and device queries -------------------------------------------------------
    def default_dtype(self) -> torch.dtype:
        # float32 everywhere by default: without native bf16 units bf16 is emulated and ~100x
        # slower, and even with AMX, bf16 decode at batch 1 measured 3.5x slower than fp32 here
        # (matmul 1x576x3072: 1.47 ms vs 0.42 ms), while results differ from fp32 references.
        # On AMX CPUs the batched steps of an fp32 model still multiply in bf16 by default
        # (bf16_matmul.py: PAGEDLLM_CPU_BF16_GEMM unset and --dtype auto).
        return torch.float32

    def device_count(self) -> int:
        return 1

    def device_name(self, index: int = 0) -> str:
        return cpu_info().model_name

    def total_memory(self, index: int = 0) -> int:
        return host_total_memory()

    def free_memory(self, index: int = 0) -> int:
        # MemAvailable counts reclaimable page cache, which the KV cache can take.
        return host_available_memory()

    def set_device(self, index: int) -> None:
        torch.set_num_threads(self._threads if self._threads is not None else threads_from_env())

    def synchronize(self) -> None:
        # The end of every step, on the thread that runs the kernels: nothing is queued on a CPU,
        # but here the thread count follows other processes' use of our cores.
        if self.adaptive is not None:
            threads = self.adaptive.update()
            if threads is not None:
                torch.set_num_threads(threads)

    # --- configuration and memory ----------------------------------------------------------
    def check_and_update_config(self, config: EngineConfig) -> None:
        # before 'auto' is resolved: it decides the bf16 and int8 switches' defaults (default_for_dtype)
        dtype_auto = isinstance(config.model.dtype, str) and config.model.dtype == "auto"
        bf16_matmul.default_for_dtype(dtype_auto)
        super().check_and_update_config(config)  # resolves dtype 'auto' and validates it
        kv_space_from_env()  # a bad PAGEDLLM_CPU_KV_CACHE_SPACE fails at startup, not at sizing
        ipex_kernels.ipex_wanted()  # likewise a bad or unsatisfiable PAGEDLLM_CPU_IPEX
        try:
            required = clib.wanted() == "1"
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        kernels, why = clib.status()
        if required and kernels is None:
            raise ConfigError(f"{clib.KERNELS_ENV}=1 but the CPU kernels are {why}")
        from pagedllm_cpu.capture import capture_budget, capture_mode

        try:
            capture_budget()
            capture_mode()
            cpu_malloc.mode()  # a bad PAGEDLLM_CPU_MALLOC fails at startup
            bf16_matmul.mode()
            tiles = bf16_matmul.tiles_mode()
            if tiles in ("on", "compact") and (kernels is None or not kernels.amx_bf16):
                logger.warning(
                    "cpu: %s=%s has no effect: no AMX tiles here (CPU flags, build or OS)", bf16_matmul.TILES_ENV, tiles
                )
            from pagedllm_cpu.ops import check_int8_mode, default_for_dtype

            default_for_dtype(dtype_auto)  # the int8 switch's default needs the kernels (VNNI or not)
            check_int8_mode(kernels)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._auto_kv_cache_dtype(config, kernels, dtype_auto)
        par = config.parallel
        self._threads = threads_from_env(getattr(par, "world_size", par.tensor_parallel_size))
        torch.set_num_threads(self._threads)
        note = load_note(cpu_info().physical_cores)
        if note is not None:
            logger.warning("cpu: %s; %s", note, self._thread_policy(config.parallel.tensor_parallel_size))

    def _auto_kv_cache_dtype(self, config: EngineConfig, kernels: Any, dtype_auto: bool) -> None:
        """``--kv-cache-dtype auto`` beside ``--dtype auto`` where the batched steps multiply in bf16 on
        AMX tiles: the fp32 model's KV cache in bf16 (as vLLM's CPU backend, whose ``auto`` model dtype
        is bf16 there). Halves the bytes batched decode attention reads and the cache's memory; greedy
        parity as the AMX path's (README, "bf16 KV cache"). ``--kv-cache-dtype float32`` keeps fp32."""
        if not dtype_auto or str(config.cache.kv_cache_dtype).strip().lower() != "auto":
            return
        # dtype_auto: the base class resolved it to default_dtype() (a torch dtype)
        if config.model.dtype != torch.float32 or not _amx_bf16_steps(kernels):
            return
        config.cache.kv_cache_dtype = "bfloat16"
        logger.info(
            "cpu: KV cache in bfloat16 (--kv-cache-dtype auto with bf16 AMX matmuls; --kv-cache-dtype float32 keeps fp32)"
        )

    def kv_cache_budget(self, config: EngineConfig) -> int:
        if config.cache.kv_cache_memory is not None:
            return config.cache.kv_cache_memory
        from_env = kv_space_from_env()
        free = self.free_memory()
        if from_env is not None:
            if from_env > free:
                logger.warning(
                    "%s asks for %.1f GiB of KV cache but only %.1f GiB is free",
                    KV_SPACE_ENV,
                    from_env / GiB,
                    free / GiB,
                )
            return from_env
        return min(DEFAULT_KV_CACHE_BYTES, free // 2)

    # --- kernels, collectives --------------------------------------------------------------
    def attention_backend(self, spec: AttentionSpec) -> CpuAttentionBackend:
        kernels, _ = clib.status()
        if kernels is not None and spec.dtype == torch.float32:
            # The C kernels (and the decode capture they allow) beat IPEX's paged attention at
            # fp32: 2-4x at decode batches 16-64 on an AVX2 EPYC (README, "CPU backend settings").
            return CpuAttentionBackend(spec, kernels=kernels)
        return CpuAttentionBackend(spec, ipex=self._ipex_kernels(), kernels=kernels)

    def _ipex_kernels(self) -> Any:
        """The IPEX kernels when selected (imported on first use only), else None."""
        if self._ipex is None and ipex_kernels.ipex_wanted():
            self._ipex = ipex_kernels.load()
        return self._ipex

    def communicator(self, group: Any = None) -> CpuCommunicator:
        return CpuCommunicator(group)

    def _thread_policy(self, tp_size: int) -> str:
        if os.environ.get(THREADS_ENV, "").strip():
            return f"{THREADS_ENV} fixes the thread count"
        if tp_size > 1:
            return "tensor-parallel ranks keep their thread count (set PAGEDLLM_CPU_THREADS to lower it)"
        return "the thread count drops to the cores left free while others keep cores busy"

    def _start_adapting(self, config: EngineConfig) -> None:
        """Let the thread count follow contention: only where it is ours to choose (not set by
        PAGEDLLM_CPU_THREADS) and one rank owns the cores (TP ranks would count each other)."""
        self.adaptive = None
        if os.environ.get(THREADS_ENV, "").strip() or config.parallel.tensor_parallel_size > 1:
            return
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        base = self._threads if self._threads is not None else threads_from_env()
        adaptive = AdaptiveThreads(cpus, base)
        if base > 1 and adaptive.available:
            self.adaptive = adaptive

    def compile_or_capture(self, model_runner: Any) -> None:
        """Capture small decode steps as replayable C kernel call lists (capture.py) for fp32 models:
        each size on its first step (PAGEDLLM_CPU_CAPTURE=lazy, default) or all now (startup)."""
        self.decode_graphs = None
        self._start_adapting(model_runner.config)  # the steps start next
        logger.info("cpu: malloc: %s", cpu_malloc.tune())
        self._decide_amx_tiles(model_runner.model)
        if model_runner.config.device.enforce_eager:
            logger.info("cpu: enforce_eager set, decode steps run eagerly")
            return
        if clib.status()[0] is None or model_runner.dtype != torch.float32:
            return
        if not hasattr(model_runner, "decode_inputs_for_capture"):
            return
        from pagedllm_cpu.capture import CpuDecodeGraphs, capture_mode

        if capture_mode() == "lazy":  # each size on the first step that needs it
            graphs = CpuDecodeGraphs(model_runner, lazy=True)
        else:
            graphs = CpuDecodeGraphs(model_runner)
            graphs.capture()
            if not graphs.captured:
                return
        self.decode_graphs = graphs
        model_runner.decode_graphs = graphs

    def _decide_amx_tiles(self, model: torch.nn.Module) -> None:
        """PAGEDLLM_CPU_AMX_TILES=auto: keep the own AMX kernel's packed tiles for a small model."""
        kernels, _ = clib.status()
        if bf16_matmul.tiles_mode() != "auto" or kernels is None or not kernels.amx_bf16 or not bf16_matmul.enabled():
            return
        _, why = bf16_matmul.decide_auto_tiles(model, self.total_memory())
        logger.info("cpu: AMX tiles %s (%s=auto; on, compact or off to choose)", why, bf16_matmul.TILES_ENV)

    def greedy_argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy rows' argmax in C where the kernels are built (cpu_ops.c, ``argmax_rows``: the same
        first-maximum / NaN semantics as torch.max, rows split between threads; 64 x 49152 logits
        0.2-0.6 ms against 1.7-2.0 for torch.max), else torch's."""
        kernels, _ = clib.status()
        if kernels is None or logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.dim() != 2:
            return super().greedy_argmax(logits)
        if logits.shape[1] == 0 or logits.stride(1) != 1 or logits.stride(0) < logits.shape[1]:
            return super().greedy_argmax(logits)  # empty rows, or not one row after another (e.g. expanded)
        return kernels.argmax_rows(logits)

    def describe(self) -> dict[str, Any]:
        info = cpu_info()
        status = ipex_kernels.ipex_status()
        try:
            if not status.usable:
                ipex = f"not used: {status.reason}"
            elif not ipex_kernels.ipex_wanted():
                ipex = f"not used: disabled by {ipex_kernels.IPEX_ENV} ({status.reason})"
            else:
                self._ipex_kernels()
                ipex = f"used: intel_extension_for_pytorch {status.version} paged attention" + (
                    " for bfloat16/float16 (fp32 runs the faster C kernels)" if clib.status()[0] is not None else ""
                )
        except (RuntimeError, ValueError) as exc:
            ipex = f"not used: {exc}"
        return {
            "cpu": f"{info.model_name} ({info.arch}; {info.isa})",
            "cores": f"{info.physical_cores} physical, {torch.get_num_threads()} torch threads",
            "contention": self.adaptive.describe()
            if self.adaptive is not None
            else (load_note(info.physical_cores) or "cores not oversubscribed (load average)")
            + f"; {self._thread_policy(1)}",
            "native bf16": "yes (float32 by default; --dtype bfloat16 to use it)"
            if info.native_bf16
            else "no (float32 by default)",
            "attention": self._attention_name(),
            "ipex": ipex,
            "c kernels": clib.status()[1],
            "matmul": self._matmul_paths(),
            "decode capture": self.decode_graphs.describe()
            if self.decode_graphs is not None
            else "none yet (fp32 with C kernels: steps of up to 64 sequences are captured on first use)",
            "kv cache": f"{self._budget_source()}; {self._kv_dtype_note()}",
            "malloc": cpu_malloc.describe(),
        }

    def _matmul_paths(self) -> str:
        """Which matmul path each layer type takes and why (bf16_matmul.py; measured when enabled)."""
        from pagedllm_cpu.ops import INT8_ENV, describe_int8, packed_linear
        from pagedllm_cpu.ops import default_for_dtype as int8_default_for_dtype

        unset = [name for name in (bf16_matmul.GEMM_ENV, INT8_ENV) if name not in os.environ]
        prefix = ""
        if unset and clib.status()[0] is not None:
            # no engine configured here: report what a default engine (--dtype auto) would run
            bf16_matmul.default_for_dtype(True)
            int8_default_for_dtype(True)
            prefix = f"(as with --dtype auto, the default; --dtype float32 sets {' and '.join(unset)} off)\n"
        try:
            text = prefix + bf16_matmul.describe(packed_linear)
        except ValueError as exc:  # a bad PAGEDLLM_CPU_BF16_GEMM
            text = f"fp32 panels; {exc}"
        text += "\n" + describe_int8()
        return text.replace("\n", "\n" + " " * 16)  # continuation lines under the report's value column

    def _attention_name(self) -> str:
        if clib.status()[0] is not None:
            other = "IPEX paged attention" if self._ipex is not None else "SDPA"
            return f"cpu-c (paged attention in C for fp32; {other} for other dtypes, SDPA for long fp32 prefills)"
        if self._ipex is not None:
            return "cpu-ipex"
        return "cpu-torch (vectorised paged SDPA)"

    def _kv_dtype_note(self) -> str:
        """What --kv-cache-dtype auto keeps an fp32 model's cache in here (_auto_kv_cache_dtype)."""
        try:
            amx = _amx_bf16_steps(clib.status()[0])
        except ValueError:  # a bad PAGEDLLM_CPU_BF16_GEMM, reported under matmul
            amx = False
        if amx:
            return "--kv-cache-dtype auto: bfloat16 beside the bf16 AMX matmuls (float32 to keep fp32)"
        return "--kv-cache-dtype auto: the model's dtype (bfloat16 halves an fp32 model's cache)"

    def _budget_source(self) -> str:
        raw = os.environ.get(KV_SPACE_ENV, "").strip()
        if raw:
            return f"{KV_SPACE_ENV}={raw} GiB (unless --kv-cache-memory is given)"
        return f"{min(DEFAULT_KV_CACHE_BYTES, self.free_memory() // 2) / GiB:.1f} GiB default (set {KV_SPACE_ENV})"
