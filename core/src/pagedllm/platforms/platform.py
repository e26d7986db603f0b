"""The Platform: everything device-specific the device-neutral core may ask for."""

from __future__ import annotations

import abc
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from pagedllm.attention.backend import AttentionBackend, AttentionSpec
from pagedllm.distributed.communicator import Communicator

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig


@dataclass(frozen=True, slots=True)
class PlatformCandidate:
    """What a plugin's cheap detection says: a Platform class to load, or why it declined."""

    name: str
    platform_class: str | None  # "package.module:ClassName" or "package.module.ClassName"
    reason: str = ""  # why it declined, or a short note on what was found
    priority: int = 0  # higher wins among available candidates

    @property
    def available(self) -> bool:
        return self.platform_class is not None


class Platform(abc.ABC):
    """An accelerator as the core sees it. Abstract methods are required; the rest have defaults."""

    name: ClassVar[str]
    device_type: ClassVar[str]  # torch device type: "cpu", "cuda", "xla", "npu", ...
    dist_backend: ClassVar[str]  # torch.distributed backend: "gloo", "nccl", "hccl", ...
    priority: ClassVar[int] = 0
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32,)
    # Human-readable line for reports: how this platform was actually exercised.
    verified_on: ClassVar[str] = "unverified"
    # KV blocks allocated past the scheduler's (static-shape platforms: a dummy block for padding).
    reserved_kv_blocks: ClassVar[int] = 0
    # Seeded rows are sampled on the host, so make_generator returns CPU generators (torch-xla has
    # no device generators); False: they are sampled on the platform's device.
    samples_seeded_rows_on_host: ClassVar[bool] = False

    # --- identity and device queries -------------------------------------------------------
    def default_dtype(self) -> torch.dtype:
        return self.supported_dtypes[0]

    @abc.abstractmethod
    def device_count(self) -> int: ...

    @abc.abstractmethod
    def device_name(self, index: int = 0) -> str: ...

    @abc.abstractmethod
    def total_memory(self, index: int = 0) -> int:
        """Bytes of memory the device has."""

    @abc.abstractmethod
    def free_memory(self, index: int = 0) -> int:
        """Bytes of memory free right now."""

    def device(self, index: int = 0) -> torch.device:
        return torch.device(self.device_type, index) if self.device_type != "cpu" else torch.device("cpu")

    def set_device(self, index: int) -> None:
        """Make device ``index`` current for this process."""

    def synchronize(self) -> None:
        """Wait for queued device work to finish."""

    def seed_everything(self, seed: int) -> None:
        random.seed(seed)
        torch.manual_seed(seed)

    def make_generator(self, seed: int) -> torch.Generator:
        """A generator for per-request seeded sampling, on the device where sampling runs."""
        g = torch.Generator(device=self.device())
        g.manual_seed(seed)
        return g

    def describe(self) -> dict[str, Any]:
        """Extra facts for `pagedllm env` and conformance reports (fast paths used or not, why)."""
        return {}

    # --- configuration and memory ----------------------------------------------------------
    def check_and_update_config(self, config: "EngineConfig") -> None:
        """Apply platform rules to the config (idempotent). Default: pick a dtype if 'auto'."""
        from pagedllm.config import parse_dtype

        if parse_dtype(config.model.dtype) is None:
            config.model.dtype = self.default_dtype()
        dtype = parse_dtype(config.model.dtype)
        if dtype not in self.supported_dtypes:
            from pagedllm.errors import ConfigError

            names = ", ".join(str(d).removeprefix("torch.") for d in self.supported_dtypes)
            raise ConfigError(
                f"dtype {str(dtype).removeprefix('torch.')} is not supported on {self.name}; use one of {names}",
                param="dtype",
            )

    def kv_cache_budget(self, config: "EngineConfig") -> int:
        """Bytes the KV cache may take. Default: the configured amount, else a fraction of free memory."""
        if config.cache.kv_cache_memory is not None:
            return config.cache.kv_cache_memory
        return int(self.free_memory() * config.cache.gpu_memory_utilization)

    # --- kernels, collectives, graphs ------------------------------------------------------
    @abc.abstractmethod
    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        """The attention backend for a layer of this shape."""

    def communicator(self, group: Any = None) -> Communicator:
        return Communicator(group)

    def compile_or_capture(self, model_runner: Any) -> None:
        """Capture graphs or compile the model; default does nothing (eager)."""

    def inference_context(self) -> Any:
        """The no-autograd context steps run in: inference_mode, unless the device cannot use it."""
        return torch.inference_mode()

    def pad_num_tokens(self, num_tokens: int, config: "EngineConfig") -> int:
        """Static-shape platforms round a batch's token count up to a bucket; default: no padding."""
        buckets = config.scheduler.token_buckets
        if not buckets:
            return num_tokens
        for b in sorted(buckets):
            if b >= num_tokens:
                return b
        return num_tokens

    def runs_tensor_parallel_in_process(self, config: "EngineConfig") -> bool:
        """Whether tensor parallelism runs in this one process (SPMD: one program sharded over the
        platform's devices) instead of one process per rank; default False."""
        return False

    def pad_host_inputs(self, h: Any, model_runner: Any) -> Any:
        """Static-shape platforms pad a step's host inputs (a ``HostInputs``) to a compiled shape
        bucket (tokens, sequences, block-table width); default: unchanged."""
        return h

    def greedy_argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's argmax of fp32 ``logits`` [N, V] (rows may be strided), for the Sampler's greedy
        rows: the first maximum, a NaN counting as the maximum, exactly ``torch.max(logits, -1).indices``
        (the default: ``max(...).indices`` measured ~1.6x faster than ``argmax`` on CPU). A platform with
        a faster kernel of the same semantics overrides it. -> [N] int64"""
        return torch.max(logits, dim=-1).indices

    def sample(self, model_runner: Any, hidden: torch.Tensor, rows: list[int], seqs: list[Any]) -> Any:
        """Sample one token per row of ``hidden`` on the device (a ``SamplerOutput``), or None to
        let the model runner's Sampler do it (the default)."""
        return None


def env_platform_override() -> str | None:
    value = os.environ.get("PAGEDLLM_PLATFORM", "").strip()
    return value or None
