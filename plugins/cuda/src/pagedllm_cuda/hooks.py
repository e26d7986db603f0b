"""Entry point of pagedllm-cuda: cheap detection (no CUDA context, no triton import) and registration.

GPUs are counted through NVML (the driver's management library, loaded with ctypes), never
through the CUDA runtime, so detection neither creates a context nor breaks a later fork.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

import torch
from pagedllm.kernels.interpret import triton_candidate
from pagedllm.plugin import PlatformCandidate, PluginRegistry, hookimpl

PLUGIN_API_VERSION = (1, 0)
PRIORITY = 100  # an accelerator beats the CPU platform (10)


def nvml_device_count() -> tuple[int | None, str]:
    """(number of NVIDIA GPUs, "") from NVML, or (None, why it could not be asked)."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        if os.path.exists("/proc/driver/nvidia"):
            return None, "NVIDIA kernel driver loaded but libnvidia-ml.so.1 is not loadable"
        return None, "no NVIDIA driver (/proc/driver/nvidia missing)"
    if nvml.nvmlInit_v2() != 0:
        return None, "NVIDIA driver present but NVML failed to initialise"
    try:
        count = ctypes.c_uint(0)
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None, "NVML could not count devices"
        return count.value, ""
    finally:
        nvml.nvmlShutdown()


def detect() -> tuple[bool, str]:
    """(usable, reason): whether this machine can run the CUDA backend, and the specific why."""
    if torch.version.cuda is None:
        _, driver = nvml_device_count()
        detail = f"; {driver}" if driver else ""
        return False, f"torch {torch.__version__} built without CUDA (torch.version.cuda is None){detail}"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False, "CUDA_VISIBLE_DEVICES hides every GPU"
    count, why = nvml_device_count()
    if count is None:
        return False, why
    if count == 0:
        return False, "NVML reports no NVIDIA GPU"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'pagedllm[triton]')"
    return True, f"{count} NVIDIA GPU(s) via NVML, CUDA {torch.version.cuda}"


@hookimpl
def pagedllm_platform() -> PlatformCandidate:
    return triton_candidate(
        "cuda",
        detect(),
        "pagedllm_cuda.platform:CudaPlatform",
        "pagedllm_cuda.platform:CudaInterpreterPlatform",
        PRIORITY,
    )


@hookimpl
def pagedllm_register(registry: PluginRegistry) -> None:
    from pagedllm_cuda.ops import register_ops

    register_ops(registry)
