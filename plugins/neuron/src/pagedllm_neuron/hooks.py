"""Entry point of pagedllm-neuron: cheap detection (no torch_neuronx or torch_xla import)."""

from __future__ import annotations

import ctypes.util
import glob
import importlib.util
import os

from pagedllm.kernels.xla_twin import xla_candidate
from pagedllm.plugin import PlatformCandidate, PluginRegistry, hookimpl

PLUGIN_API_VERSION = (1, 0)
PRIORITY = 100  # an accelerator beats the CPU platform (10)


def neuron_runtime_present() -> bool:
    """The Neuron runtime library (libnrt, from the aws-neuronx-runtime-lib package)."""
    return ctypes.util.find_library("nrt") is not None or os.path.exists("/opt/aws/neuron/lib/libnrt.so.1")


def detect() -> tuple[bool, str]:
    """(usable, reason): whether this machine can run the Neuron backend, and the specific why."""
    devices = sorted(glob.glob("/dev/neuron[0-9]*"))
    if not devices:
        return False, "no Neuron device (/dev/neuron*) found"
    if os.environ.get("NEURON_RT_VISIBLE_CORES", None) == "":
        return False, "NEURON_RT_VISIBLE_CORES is empty: every NeuronCore is hidden"
    if not neuron_runtime_present():
        return False, f"{len(devices)} Neuron device(s) found but the Neuron runtime library (libnrt) is missing"
    if importlib.util.find_spec("torch_neuronx") is None:
        return False, f"{len(devices)} Neuron device(s) found but torch_neuronx is not installed (AWS's pip index)"
    if importlib.util.find_spec("torch_xla") is None:
        return False, f"{len(devices)} Neuron device(s) found but torch_xla is not installed"
    return True, f"{len(devices)} Neuron device(s), Neuron runtime present"


@hookimpl
def pagedllm_platform() -> PlatformCandidate:
    return xla_candidate(
        "neuron", detect(), "pagedllm_neuron.platform:NeuronPlatform", "pagedllm_neuron.platform:NeuronXlaCpuPlatform", PRIORITY
    )


@hookimpl
def pagedllm_register(registry: PluginRegistry) -> None:
    from pagedllm.kernels.xla.ops import register_ops  # imports torch-xla: only once this plugin is selected

    register_ops(registry)
