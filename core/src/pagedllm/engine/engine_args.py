"""EngineArgs: the user-facing engine options (Python kwargs and vLLM-style CLI flags) -> EngineConfig."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any

from pagedllm.config import (
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    KVEventsConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    StructuredOutputsConfig,
)
from pagedllm.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_memory(value: int | float | str | None) -> int | None:
    """Bytes from an int or a string such as "4GiB", "512MiB", "2g" (decimal units without an i)."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"cannot parse memory size {value!r}; use bytes or a size like 4GiB, 512MiB, 2GB",
            param="kv_cache_memory",
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _read_chat_template(value: str | None) -> str | None:
    """A chat template given inline or as a path to a file holding it (as vLLM accepts)."""
    if value is None:
        return None
    if "{" not in value and os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value


@dataclass
class EngineArgs:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct GGUF
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory: int | str | None = None
    kv_cache_dtype: str = "auto"
    num_gpu_blocks_override: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_waiting_requests: int | None = None
    seed: int = 0
    served_model_name: str | None = None
    chat_template: str | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    platform: str | None = None
    enforce_eager: bool = False
    gpu_memory_utilization: float = 0.9
    revision: str | None = None  # hub models: branch, tag or commit
    structured_outputs_backend: str = "xgrammar"
    kv_events_config: str | dict | None = None  # JSON, as vLLM's --kv-events-config
    quantized_weights: str = "blocks"  # GGUF: keep the blocks where the platform multiplies them, or "dense"

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        d = EngineArgs()
        g = parser.add_argument_group("engine")
        g.add_argument(
            "--model",
            default=d.model,
            help="HF directory or .gguf file (default: embedded SmolLM2-135M-Instruct)",
        )
        g.add_argument("--tokenizer", default=d.tokenizer, help="tokenizer directory (default: the model's)")
        g.add_argument("--revision", default=d.revision,
                       help="Hugging Face model: the branch, tag or commit to use (default: main)")
        g.add_argument("--dtype", default=d.dtype, help="auto, float32, float16 or bfloat16")
        g.add_argument(
            "--quantized-weights",
            choices=("blocks", "dense"),
            default=d.quantized_weights,
            help="GGUF models: keep only the quantized blocks where the platform multiplies them "
            "(blocks, default: a fraction of the memory) or dequantize every weight at load (dense)",
        )
        g.add_argument(
            "--max-model-len", type=int, default=d.max_model_len, help="context length (default: the model's)"
        )
        g.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV cache block")
        g.add_argument(
            "--enable-prefix-caching",
            action=argparse.BooleanOptionalAction,
            default=d.enable_prefix_caching,
            help="reuse KV blocks of identical prompt prefixes",
        )
        g.add_argument(
            "--kv-cache-memory", default=d.kv_cache_memory, help="KV cache size: bytes or e.g. 4GiB"
        )
        g.add_argument(
            "--kv-cache-dtype",
            default=d.kv_cache_dtype,
            help="KV cache element type: auto (the model's dtype, or the platform's choice: the CPU backend "
            "picks bfloat16 where its batched steps multiply in bf16 on AMX), float32, float16 or bfloat16 where the "
            "platform keeps it (the CPU backend: bfloat16 beside a float32 model halves the cache's memory and traffic)",
        )
        g.add_argument(
            "--num-gpu-blocks-override",
            type=int,
            default=d.num_gpu_blocks_override,
            help="exact number of KV cache blocks (overrides --kv-cache-memory)",
        )
        g.add_argument(
            "--max-num-seqs", type=int, default=d.max_num_seqs, help="most sequences running at once"
        )
        g.add_argument(
            "--max-num-batched-tokens",
            type=int,
            default=d.max_num_batched_tokens,
            help="token budget per step (long prompts are chunked to fit)",
        )
        g.add_argument(
            "--max-waiting-requests",
            type=int,
            default=d.max_waiting_requests,
            help="reject new requests with 429 beyond this many waiting",
        )
        g.add_argument("--seed", type=int, default=d.seed)
        g.add_argument("--served-model-name", default=d.served_model_name)
        g.add_argument(
            "--chat-template", default=d.chat_template, help="Jinja chat template, inline or a file path"
        )
        g.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size)
        g.add_argument(
            "--pipeline-parallel-size",
            "-pp",
            type=int,
            default=d.pipeline_parallel_size,
            help="pipeline stages (layers split across ranks)",
        )
        g.add_argument(
            "--distributed-executor-backend",
            choices=("uni", "mp", "ray"),
            default=d.distributed_executor_backend,
            help="how ranks run: uni (one rank, in process), mp (a process per rank; the default for "
            "more than one), ray (Ray actors, across machines)",
        )
        g.add_argument("--platform", default=d.platform, help="platform plugin to use (default: detected)")
        g.add_argument(
            "--enforce-eager",
            action="store_true",
            default=d.enforce_eager,
            help="never capture graphs or compile",
        )
        g.add_argument(
            "--gpu-memory-utilization",
            type=float,
            default=d.gpu_memory_utilization,
            help="fraction of free device memory the KV cache may take when --kv-cache-memory is unset",
        )
        g.add_argument(
            "--structured-outputs-backend",
            choices=("xgrammar", "llguidance"),
            default=d.structured_outputs_backend,
            help="grammar library for response_format / structured_outputs / tool choice (default: xgrammar)",
        )
        g.add_argument(
            "--kv-events-config",
            default=d.kv_events_config,
            help='publish prefix-cache events over ZMQ, e.g. \'{"enable_kv_cache_events": true, '
            '"endpoint": "tcp://*:5557", "snapshot_endpoint": "tcp://*:5558"}\'',
        )
        return parser

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names})

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(
                f"unknown engine argument(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return cls(**kwargs)

    def create_engine_config(self) -> EngineConfig:
        from pagedllm.model.loader.hub import resolve_hub_model, split_hub_name

        model, served_model_name = self.model, self.served_model_name
        if model is not None and split_hub_name(model) is not None:
            # A hub name: fetched (or found in the cache) here, before the engine starts; served as named.
            model = resolve_hub_model(model, revision=self.revision)
            served_model_name = served_model_name or self.model
        elif self.revision is not None:
            raise ConfigError("--revision applies to Hugging Face model names only, not to local paths",
                              param="revision")
        return EngineConfig(
            model=ModelConfig(
                model=model,
                tokenizer=self.tokenizer,
                dtype=self.dtype,
                max_model_len=self.max_model_len,
                seed=self.seed,
                served_model_name=served_model_name,
                chat_template=_read_chat_template(self.chat_template),
                quantized_weights=self.quantized_weights,
            ),
            cache=CacheConfig(
                block_size=self.block_size,
                enable_prefix_caching=self.enable_prefix_caching,
                kv_cache_memory=parse_memory(self.kv_cache_memory),
                kv_cache_dtype=self.kv_cache_dtype,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
                gpu_memory_utilization=self.gpu_memory_utilization,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
                max_waiting_requests=self.max_waiting_requests,
            ),
            parallel=ParallelConfig(
                tensor_parallel_size=self.tensor_parallel_size,
                pipeline_parallel_size=self.pipeline_parallel_size,
                distributed_executor_backend=self.distributed_executor_backend,
            ),
            device=DeviceConfig(platform=self.platform, enforce_eager=self.enforce_eager),
            structured_outputs=StructuredOutputsConfig(backend=self.structured_outputs_backend),
            kv_events=None if self.kv_events_config is None else KVEventsConfig.from_json(self.kv_events_config),
        )
