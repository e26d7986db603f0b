"""A test-only backend plugin whose kernel raises on demand: the CPU plugin with its ``silu_and_mul``
wrapped to raise once a trigger file exists. Installed as a real plugin (package + dist-info with a
``pagedllm`` entry point) in a temporary site that only the server under test sees."""

from __future__ import annotations

from pathlib import Path

FAULT_ENV = "PAGEDLLM_TEST_FAULT_FILE"

_HOOKS = f'''
"""Entry point of the test-only faulty plugin (a stand-in for a backend whose kernel fails)."""

import os

import torch
from pagedllm.plugin import PlatformCandidate, hookimpl

PLUGIN_API_VERSION = (1, 0)


@hookimpl
def pagedllm_platform():
    return PlatformCandidate("faulty", "pagedllm_faulty.hooks:FaultyPlatform", "test-only faulty kernel",
                             priority=-100)


def _make_platform():
    from pagedllm_cpu.platform import CpuPlatform

    class FaultyPlatform(CpuPlatform):
        name = "faulty"
        verified_on = "test-only stand-in"

    return FaultyPlatform


def __getattr__(name):
    if name == "FaultyPlatform":
        return _make_platform()
    raise AttributeError(name)


@hookimpl
def pagedllm_register(registry):
    from pagedllm_cpu import hooks as cpu_hooks
    from pagedllm.plugin import native_ops

    cpu_hooks.pagedllm_register(registry=registry)
    trigger = os.environ["{FAULT_ENV}"]

    def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
        if os.path.exists(trigger):
            raise RuntimeError("injected kernel fault in silu_and_mul")
        return native_ops.silu_and_mul(x)

    registry.override_op("silu_and_mul", silu_and_mul, owner="faulty")
'''


def build_faulty_site(root: Path) -> Path:
    """``root`` laid out as site-packages holding the plugin; put it on PYTHONPATH."""
    pkg = root / "pagedllm_faulty"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text('"""Test-only faulty plugin."""\n')
    (pkg / "hooks.py").write_text(_HOOKS)
    dist = root / "pagedllm_faulty-0.0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pagedllm-faulty\nVersion: 0.0.1\n")
    (dist / "entry_points.txt").write_text("[pagedllm]\nfaulty = pagedllm_faulty.hooks\n")
    (dist / "top_level.txt").write_text("pagedllm_faulty\n")
    return root
