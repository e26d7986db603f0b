"""Entry point of pagedllm-tpu: cheap detection (no torch_xla import)."""

from __future__ import annotations

import glob
import importlib.util
import os

from pagedllm.kernels.xla_twin import xla_candidate
from pagedllm.plugin import PlatformCandidate, PluginRegistry, hookimpl

PLUGIN_API_VERSION = (1, 0)
PRIORITY = 100  # an accelerator beats the CPU platform (10)


def libtpu_present() -> bool:
    """libtpu ships as the `libtpu` wheel (torch-xla's [tpu] extra) or as TPU_LIBRARY_PATH."""
    path = os.environ.get("TPU_LIBRARY_PATH")
    return bool(path and os.path.exists(path)) or importlib.util.find_spec("libtpu") is not None


def detect() -> tuple[bool, str]:
    """(usable, reason): whether this machine can run the TPU backend, and the specific why."""
    chips = sorted(glob.glob("/dev/accel*")) or sorted(glob.glob("/dev/vfio/[0-9]*"))
    if not chips:
        return False, "no TPU chip (/dev/accel* or /dev/vfio/N) found"
    if os.environ.get("TPU_VISIBLE_CHIPS", None) == "":
        return False, "TPU_VISIBLE_CHIPS is empty: every chip is hidden"
    if not libtpu_present():
        return False, f"{len(chips)} TPU chip(s) found but libtpu is not installed (pip install 'torch_xla[tpu]')"
    if importlib.util.find_spec("torch_xla") is None:
        return False, f"{len(chips)} TPU chip(s) found but torch_xla is not installed (pip install 'pagedllm[xla]')"
    return True, f"{len(chips)} TPU chip(s) ({', '.join(chips[:4])}), libtpu present"


@hookimpl
def pagedllm_platform() -> PlatformCandidate:
    return xla_candidate("tpu", detect(), "pagedllm_tpu.platform:TpuPlatform", "pagedllm_tpu.platform:TpuXlaCpuPlatform", PRIORITY)


@hookimpl
def pagedllm_register(registry: PluginRegistry) -> None:
    from pagedllm.kernels.xla.ops import register_ops  # imports torch-xla: only once this plugin is selected

    register_ops(registry)
