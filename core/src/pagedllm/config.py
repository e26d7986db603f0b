"""Engine configuration: small validated dataclasses composed into EngineConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedllm.errors import ConfigError

if TYPE_CHECKING:
    import torch

# dtype names -> torch's; torch is imported only to turn a name into a dtype, so the API server's
# process, which validates configs but never computes, does not load it (~200 MiB of RSS).
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def dtype_name(dtype: str | torch.dtype) -> str | None:
    """torch's name of ``dtype`` (a name or a torch.dtype); None for 'auto'."""
    if not isinstance(dtype, str):  # a torch.dtype: torch is loaded already
        return str(dtype).removeprefix("torch.")
    if dtype == "auto":
        return None
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ConfigError(
            f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16", param="dtype"
        ) from None


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    """'auto' -> None (the platform decides); a name or torch.dtype -> torch.dtype."""
    if not isinstance(dtype, str):
        return dtype
    name = dtype_name(dtype)
    if name is None:
        return None
    import torch

    return getattr(torch, name)


@dataclass(slots=True)
class ModelConfig:
    """What to run. ``model`` None means the embedded default (SmolLM2-135M-Instruct GGUF)."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    max_model_len: int | None = None
    seed: int = 0
    served_model_name: str | None = None
    chat_template: str | None = None
    # GGUF block formats: "blocks" keeps only the blocks where the platform's packed_linear multiplies
    # them; "dense" dequantizes every weight to the model dtype at load.
    quantized_weights: str = "blocks"
    # Filled by the loader once the checkpoint is inspected.
    hf_config: Any = None
    architecture: str | None = None
    torch_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        dtype_name(self.dtype)  # validates without importing torch
        if self.quantized_weights not in ("blocks", "dense"):
            raise ConfigError(
                f"quantized_weights must be 'blocks' or 'dense', got {self.quantized_weights!r}",
                param="quantized_weights",
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}", param="max_model_len")


@dataclass(slots=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory: int | None = None  # bytes; None lets the platform decide
    num_gpu_blocks_override: int | None = None  # exact number of blocks (tests, tiny caches)
    gpu_memory_utilization: float = 0.9
    # The KV cache's element type: "auto" (the model's dtype, unless the platform's check_and_update_config
    # picks another) or a dtype name the platform's attention backend keeps
    # (AttentionBackend.supports_kv_cache_dtype); e.g. bfloat16 halves an fp32 model's cache.
    kv_cache_dtype: str = "auto"
    # Filled once the budget is known.
    num_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size > 1024:
            raise ConfigError(f"block_size must be in [1, 1024], got {self.block_size}", param="block_size")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}",
                param="gpu_memory_utilization",
            )
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ConfigError("kv_cache_memory must be positive", param="kv_cache_memory")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ConfigError("num_gpu_blocks_override must be >= 1", param="num_gpu_blocks_override")
        try:
            dtype_name(self.kv_cache_dtype)
        except ConfigError:
            raise ConfigError(
                f"unknown kv_cache_dtype {self.kv_cache_dtype!r}; use auto (the model's dtype), float32, float16 or bfloat16",
                param="kv_cache_dtype",
            ) from None


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_waiting_requests: int | None = None
    # Static-shape platforms (graphs, XLA) ask the runner to pad token counts to these buckets.
    token_buckets: list[int] | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}", param="max_num_seqs")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}",
                param="max_num_batched_tokens",
            )


DISTRIBUTED_EXECUTOR_BACKENDS = ("uni", "mp", "ray")


@dataclass(slots=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # None: "uni" when the world size is 1, else "mp"

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ConfigError("tensor_parallel_size must be >= 1", param="tensor_parallel_size")
        if self.pipeline_parallel_size < 1:
            raise ConfigError("pipeline_parallel_size must be >= 1", param="pipeline_parallel_size")
        backend = self.distributed_executor_backend
        if backend is not None and backend not in DISTRIBUTED_EXECUTOR_BACKENDS:
            raise ConfigError(
                f"distributed_executor_backend {backend!r} is unknown; use one of "
                + ", ".join(DISTRIBUTED_EXECUTOR_BACKENDS),
                param="distributed_executor_backend",
            )
        if backend == "uni" and self.world_size > 1:
            raise ConfigError(
                f"distributed_executor_backend 'uni' runs one rank, but tensor x pipeline parallel is "
                f"{self.world_size}; use 'mp' or 'ray'",
                param="distributed_executor_backend",
            )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def executor_backend(self) -> str:
        """The backend to use: the configured one, else 'uni' for one rank and 'mp' for more."""
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "uni" if self.world_size == 1 else "mp"


@dataclass(slots=True)
class DeviceConfig:
    platform: str | None = None  # None: discovery picks (PAGEDLLM_PLATFORM wins)
    enforce_eager: bool = False  # never capture graphs / compile


@dataclass(slots=True)
class StructuredOutputsConfig:
    backend: str = "xgrammar"  # the grammar library: "xgrammar" or "llguidance"

    def __post_init__(self) -> None:
        if self.backend not in ("xgrammar", "llguidance"):
            raise ConfigError(
                f"structured outputs backend {self.backend!r} is unknown; use xgrammar or llguidance",
                param="structured_outputs_backend",
            )


@dataclass(slots=True)
class KVEventsConfig:
    """KV cache events (``--kv-events-config``, shaped like vLLM's): ZMQ PUB of the prefix-cache index's
    changes with sequence numbers, and a snapshot endpoint a subscriber resyncs from after a gap."""

    enable_kv_cache_events: bool = False
    publisher: str = "zmq"
    endpoint: str = "tcp://*:5557"  # PUB: [topic, seq (8 bytes big-endian), JSON batch]
    snapshot_endpoint: str = "tcp://*:5558"  # ROUTER: b"snapshot" -> [seq, JSON of every cached block]
    topic: str = "kv-events"
    hwm: int = 100_000  # messages queued per subscriber before ZMQ drops (the subscriber then resyncs)

    def __post_init__(self) -> None:
        if self.publisher != "zmq":
            raise ConfigError(f"kv events publisher must be 'zmq', got {self.publisher!r}", param="kv_events_config")
        if self.endpoint == self.snapshot_endpoint:
            raise ConfigError("kv events endpoint and snapshot_endpoint must differ", param="kv_events_config")
        if self.hwm < 0:
            raise ConfigError(f"kv events hwm must be >= 0, got {self.hwm}", param="kv_events_config")

    @classmethod
    def from_json(cls, text: str | dict) -> KVEventsConfig:
        import dataclasses
        import json

        try:
            data = json.loads(text) if isinstance(text, str) else dict(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--kv-events-config is not valid JSON: {exc}", param="kv_events_config") from None
        if not isinstance(data, dict):
            raise ConfigError("--kv-events-config must be a JSON object", param="kv_events_config")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown --kv-events-config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
                param="kv_events_config",
            )
        return cls(**data)


@dataclass(slots=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    kv_events: KVEventsConfig | None = None
