"""Entry point of pagedllm-rocm (placeholder until the Triton backend lands)."""

from __future__ import annotations

from pagedllm.plugin import PlatformCandidate, hookimpl

PLUGIN_API_VERSION = (1, 0)


@hookimpl
def pagedllm_platform() -> PlatformCandidate:
    return PlatformCandidate("rocm", None, "backend not implemented yet")
