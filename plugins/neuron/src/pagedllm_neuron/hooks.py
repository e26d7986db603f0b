"""Entry point of pagedllm-neuron: cheap detection (no torch_neuronx import)."""

from __future__ import annotations

import glob
import importlib.util

from pagedllm.plugin import PlatformCandidate, hookimpl

PLUGIN_API_VERSION = (1, 0)


@hookimpl
def pagedllm_platform() -> PlatformCandidate:
    if importlib.util.find_spec("torch_neuronx") is None:
        return PlatformCandidate("neuron", None, "torch_neuronx is not installed")
    if not glob.glob("/dev/neuron*"):
        return PlatformCandidate("neuron", None, "torch_neuronx is installed but no /dev/neuron* device found")
    return PlatformCandidate("neuron", None, "Neuron device found, but the pagedllm-neuron backend is not implemented yet")
