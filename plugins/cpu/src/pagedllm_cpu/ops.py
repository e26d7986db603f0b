"""CPU op overrides (none yet: the torch-native defaults are used)."""

from __future__ import annotations

from pagedllm.plugin import PluginRegistry


def register_ops(registry: PluginRegistry) -> None:
    return None
