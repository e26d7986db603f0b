"""Entry point of pagedllm-cpu: a CPU is always there."""

from __future__ import annotations

from pagedllm.plugin import PlatformCandidate, PluginRegistry, hookimpl

PLUGIN_API_VERSION = (1, 1)


@hookimpl
def pagedllm_platform() -> PlatformCandidate:
    return PlatformCandidate(
        "cpu", "pagedllm_cpu.platform:CpuPlatform", "a CPU is always available", priority=10
    )


@hookimpl
def pagedllm_register(registry: PluginRegistry) -> None:
    from pagedllm_cpu.ops import register_ops

    register_ops(registry)
