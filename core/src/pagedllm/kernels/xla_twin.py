"""The documented switch that runs the XLA backends (tpu, neuron) on torch-xla's CPU device.

``PAGEDLLM_XLA_CPU=1`` makes the tpu and neuron plugins offer a twin of their platform that runs
the same static-shape graphs, buckets and warm-up on ``PJRT_DEVICE=CPU`` in float32. It exists
so both backends can be verified on machines without a TPU or a Neuron device; it is never
selected unless asked for by name, and its reports say "verified on XLA:CPU".
This module imports no vendor library, so detection hooks may use it.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedllm.platforms.platform import PlatformCandidate

ENV_VAR = "PAGEDLLM_XLA_CPU"
VERIFIED_ON = "verified on XLA:CPU (torch-xla, PJRT_DEVICE=CPU, float32; no {hardware} used)"
_TRUE = {"1", "true", "yes", "on"}


def twin_requested() -> bool:
    """True when the user asked for the XLA:CPU twins (PAGEDLLM_XLA_CPU=1)."""
    return os.environ.get(ENV_VAR, "").strip().lower() in _TRUE


def module_installed(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it (a blocked import counts as absent)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def xla_candidate(
    name: str,
    detected: tuple[bool, str],
    platform_class: str,
    twin_class: str,
    priority: int,
) -> PlatformCandidate:
    """The candidate an XLA plugin offers: the twin when requested (priority 0, only chosen by
    name), else the device platform when detection found one, else a decline naming the switch."""
    from pagedllm.platforms.platform import PlatformCandidate

    usable, reason = detected
    if twin_requested():
        if not module_installed("torch_xla"):
            return PlatformCandidate(name, None, f"{ENV_VAR}=1 but torch_xla is not installed (pip install 'pagedllm[xla]')")
        return PlatformCandidate(name, twin_class, f"XLA:CPU twin (PJRT_DEVICE=CPU); device: {reason}", priority=0)
    if not usable:
        return PlatformCandidate(name, None, f"{reason}; XLA:CPU twin: {ENV_VAR}=1")
    return PlatformCandidate(name, platform_class, reason, priority=priority)
