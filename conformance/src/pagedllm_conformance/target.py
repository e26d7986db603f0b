"""The platform under test, reached only through the discovery the server uses."""

from __future__ import annotations

import importlib.metadata as md
import platform as host_platform
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from pagedllm.platforms.discovery import Selection, register_plugin, select_platform
from pagedllm.plugin import PLUGIN_API_VERSION, Platform

from pagedllm_conformance.manifest import Manifest, dtype_name, load_plugin_manifest


def _version(distribution: str) -> str:
    try:
        return md.version(distribution)
    except md.PackageNotFoundError:
        return "not installed"


@dataclass(slots=True)
class PlatformUnderTest:
    """One selected platform, its plugin's registrations made active, and its manifest."""

    selection: Selection
    manifest: Manifest
    requested: str | None
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def platform(self) -> Platform:
        return self.selection.platform

    @property
    def name(self) -> str:
        return self.selection.plugin.name

    @property
    def verified_on(self) -> str:
        return self.manifest.verified_on or getattr(self.platform, "verified_on", "unverified")

    def dtypes(self, quick: bool) -> list[torch.dtype]:
        """The dtypes the suite exercises: fp32 and the default dtype, plus every other supported one in a full run."""
        # fp32 always runs when supported: it is the tightest oracle, where subtle kernel bugs cannot
        # hide inside half-precision tolerances.
        default = self.platform.default_dtype()
        first = [torch.float32] if torch.float32 in self.platform.supported_dtypes else []
        first += [default] if default not in first else []
        if quick:
            return first
        return first + [d for d in self.platform.supported_dtypes if d not in first and d in _TESTABLE]

    def describe(self) -> dict[str, Any]:
        """Everything a report states about the platform, plugin and environment."""
        p, plugin = self.platform, self.selection.plugin
        info: dict[str, Any] = {
            "platform": {
                "name": getattr(p, "name", None),
                "class": f"{type(p).__module__}.{type(p).__qualname__}",
                "device_type": getattr(p, "device_type", None),
                "dist_backend": getattr(p, "dist_backend", None),
                "priority": getattr(p, "priority", None),
                "supported_dtypes": [dtype_name(d) for d in getattr(p, "supported_dtypes", ())],
                "verified_on": self.verified_on,
                "selected_because": self.selection.why,
            },
            "plugin": {
                "entry_point": plugin.name,
                "distribution": plugin.distribution,
                "version": plugin.version,
                "module": plugin.module.__name__ if plugin.module else None,
                "api_version": ".".join(map(str, plugin.api_version)) if plugin.api_version else None,
                "manifest": self.manifest.source or "none (suite defaults apply)",
            },
            "versions": {
                "pagedllm": _version("pagedllm"),
                "pagedllm-conformance": _version("pagedllm-conformance"),
                "plugin_api": ".".join(map(str, PLUGIN_API_VERSION)),
                "torch": torch.__version__,
                "python": sys.version.split()[0],
                "pytest": _version("pytest"),
            },
            "host": {
                "os": host_platform.platform(),
                "machine": host_platform.machine(),
                "processor": host_platform.processor() or host_platform.machine(),
            },
        }
        device: dict[str, Any] = {}
        for key, query in (
            ("count", lambda: p.device_count()),
            ("name", lambda: p.device_name(0)),
            ("total_memory_bytes", lambda: p.total_memory(0)),
            ("free_memory_bytes", lambda: p.free_memory(0)),
            ("describe", lambda: p.describe()),
        ):
            try:
                device[key] = query()
            except Exception as exc:  # the report states what failed; the contract tests fail on it
                device[key] = f"error: {type(exc).__name__}: {exc}"
        info["device"] = device
        info.update(self.facts)
        return info


_TESTABLE = (torch.float32, torch.float16, torch.bfloat16)


def select_target(name: str | None) -> PlatformUnderTest:
    """Select ``name`` (or the server's default choice) and make its plugin's registrations active."""
    selection = select_platform(name)
    register_plugin(selection)
    manifest = load_plugin_manifest(selection.plugin.module)
    return PlatformUnderTest(selection=selection, manifest=manifest, requested=name)
