"""Entry point of pagedllm-ascend: cheap detection (no torch_npu import)."""

from __future__ import annotations

import glob
import importlib.util

from pagedllm.plugin import PlatformCandidate, hookimpl

PLUGIN_API_VERSION = (1, 0)


@hookimpl
def pagedllm_platform() -> PlatformCandidate:
    if importlib.util.find_spec("torch_npu") is None:
        return PlatformCandidate("ascend", None, "torch_npu is not installed")
    if not glob.glob("/dev/davinci[0-9]*"):
        return PlatformCandidate("ascend", None, "torch_npu is installed but no /dev/davinci* device found")
    return PlatformCandidate("ascend", None, "Ascend NPU found, but the pagedllm-ascend backend is not implemented yet")
