"""Entry point of pagedllm-tpu: cheap detection (no torch_xla import)."""

from __future__ import annotations

import glob
import importlib.util

from pagedllm.plugin import PlatformCandidate, hookimpl

PLUGIN_API_VERSION = (1, 0)


@hookimpl
def pagedllm_platform() -> PlatformCandidate:
    if importlib.util.find_spec("torch_xla") is None:
        return PlatformCandidate("tpu", None, "torch_xla is not installed")
    if not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/*"):
        return PlatformCandidate("tpu", None, "torch_xla is installed but no TPU device (/dev/accel*, /dev/vfio) found")
    return PlatformCandidate("tpu", None, "TPU found, but the pagedllm-tpu backend is not implemented yet")
