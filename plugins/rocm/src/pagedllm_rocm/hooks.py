"""Entry point of pagedllm-rocm: cheap detection (no HIP context, no triton import) and registration.

ROCm is recognised by a HIP build of torch (``torch.version.hip``); GPUs are counted from the
amdgpu driver's KFD topology in sysfs, never through the HIP runtime.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch
from pagedllm.kernels.interpret import triton_candidate
from pagedllm.plugin import PlatformCandidate, PluginRegistry, hookimpl

PLUGIN_API_VERSION = (1, 0)
PRIORITY = 100  # an accelerator beats the CPU platform (10)
KFD_NODES = "/sys/class/kfd/kfd/topology/nodes"


def kfd_gpu_count(nodes_dir: str = KFD_NODES) -> int:
    """GPU agents in the KFD topology: nodes whose properties report SIMD units (CPUs report 0)."""
    count = 0
    for props in glob.glob(os.path.join(nodes_dir, "*", "properties")):
        with open(props) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "simd_count" and int(value) > 0:
                    count += 1
                    break
    return count


def detect() -> tuple[bool, str]:
    """(usable, reason): whether this machine can run the ROCm backend, and the specific why."""
    driver = "" if os.path.exists("/dev/kfd") else "no amdgpu driver (/dev/kfd missing)"
    if torch.version.hip is None:
        detail = f"; {driver}" if driver else ""
        return False, f"torch {torch.__version__} built without ROCm (torch.version.hip is None){detail}"
    if driver:
        return False, driver
    for var in ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        if os.environ.get(var, None) in ("", "-1"):
            return False, f"{var} hides every GPU"
    count = kfd_gpu_count()
    if count == 0:
        return False, "the KFD topology lists no AMD GPU"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (ROCm torch wheels bring it as pytorch-triton-rocm)"
    return True, f"{count} AMD GPU(s) via KFD, HIP {torch.version.hip}"


@hookimpl
def pagedllm_platform() -> PlatformCandidate:
    return triton_candidate(
        "rocm",
        detect(),
        "pagedllm_rocm.platform:RocmPlatform",
        "pagedllm_rocm.platform:RocmInterpreterPlatform",
        PRIORITY,
    )


@hookimpl
def pagedllm_register(registry: PluginRegistry) -> None:
    from pagedllm_rocm.ops import register_ops

    register_ops(registry)
