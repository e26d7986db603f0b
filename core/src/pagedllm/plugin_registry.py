"""What a plugin's ``pagedllm_register`` hook may add to: op overrides and model classes."""

from __future__ import annotations

from typing import Any, Callable

from pagedllm.ops.registry import OPS


class PluginRegistry:
    """Handed to ``pagedllm_register(registry)``. No monkey-patching: everything goes through here."""

    def __init__(self) -> None:
        self.models: dict[str, type] = {}

    def override_op(self, name: str, fn: Callable[..., Any], owner: str = "plugin") -> None:
        OPS.override(name, fn, owner)

    def register_model(self, architecture: str, cls: type) -> None:
        """Add or replace the model class used for an HF ``architectures`` name."""
        self.models[architecture] = cls

    def reset(self) -> None:
        OPS.reset()
        self.models.clear()


REGISTRY = PluginRegistry()
