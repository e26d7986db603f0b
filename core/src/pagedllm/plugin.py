"""The public plugin API: the one module a backend imports from the core.

Nothing outside this module is a plugin contract. A plugin's hooks module declares the API it
was written for as a literal, e.g. ``PLUGIN_API_VERSION = (1, 0)``; the core refuses a plugin
of another major version.
"""

from pagedllm.attention.backend import AttentionBackend, AttentionBatch, AttentionSpec
from pagedllm.attention.reference import ReferenceAttentionBackend
from pagedllm.config import EngineConfig
from pagedllm.distributed.communicator import Communicator
from pagedllm.errors import ConfigError, PlatformError
from pagedllm.ops import native as native_ops
from pagedllm.ops.packed import (
    GGML_BLOCK_BYTES,
    GGML_BLOCK_WEIGHTS,
    GGML_MIXED,
    GGML_TYPE_NAMES,
    PackedWeight,
    dequantize,
)
from pagedllm.ops.registry import OPS, OpsRegistry
from pagedllm.platforms.hookspecs import hookimpl
from pagedllm.platforms.host_memory import host_available_memory, host_total_memory
from pagedllm.platforms.platform import Platform, PlatformCandidate
from pagedllm.plugin_registry import PluginRegistry
from pagedllm.plugin_version import PLUGIN_API_VERSION

__all__ = [
    "PLUGIN_API_VERSION",
    "AttentionBackend",
    "AttentionBatch",
    "AttentionSpec",
    "Communicator",
    "ConfigError",
    "PlatformError",
    "EngineConfig",
    "OPS",
    "OpsRegistry",
    "PackedWeight",
    "GGML_BLOCK_BYTES",
    "GGML_BLOCK_WEIGHTS",
    "GGML_MIXED",
    "GGML_TYPE_NAMES",
    "Platform",
    "PlatformCandidate",
    "PluginRegistry",
    "ReferenceAttentionBackend",
    "hookimpl",
    "host_available_memory",
    "host_total_memory",
    "native_ops",
    "dequantize",
]
