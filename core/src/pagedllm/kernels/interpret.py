"""The documented switch that runs the Triton backends' kernels on CPU under Triton's interpreter.

``PAGEDLLM_TRITON_INTERPRET=1`` makes the cuda and rocm plugins offer a CPU-only variant of their
platform whose kernels run on CPU tensors through ``TRITON_INTERPRET=1``. It exists so the
conformance suite can exercise the real Triton kernels on machines without a GPU; it is slow
(tens of milliseconds to seconds per launch) and is never selected unless asked for by name.
This module imports neither triton nor any vendor library, so detection hooks may use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedllm.platforms.platform import PlatformCandidate

import os

ENV_VAR = "PAGEDLLM_TRITON_INTERPRET"
VERIFIED_ON = "verified under Triton interpreter on CPU (no GPU)"
_TRUE = {"1", "true", "yes", "on"}


def interpreter_requested() -> bool:
    """True when the user asked for interpreter mode (PAGEDLLM_TRITON_INTERPRET=1)."""
    return os.environ.get(ENV_VAR, "").strip().lower() in _TRUE


def enable_interpreter() -> None:
    """Make every ``@triton.jit`` kernel defined from now on run under the interpreter.

    Triton reads TRITON_INTERPRET when triton itself and each kernel are first imported, so
    this must run before either; ``pagedllm.kernels.triton`` calls it on import, and the
    interpreter platforms refuse to start if triton was imported too early.
    """
    os.environ["TRITON_INTERPRET"] = "1"


def interpreter_active() -> bool:
    """True when kernels are (or will be) decorated for the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def triton_candidate(
    name: str,
    detected: tuple[bool, str],
    platform_class: str,
    interpreter_class: str,
    priority: int,
) -> PlatformCandidate:
    """The candidate a Triton plugin (cuda, rocm) offers, from its own hardware detection.

    Interpreter mode wins when requested (priority 0, so only chosen by name); otherwise the GPU
    platform when detection found one, else a decline that also names the interpreter switch.
    """
    import importlib.util

    from pagedllm.platforms.platform import PlatformCandidate

    usable, reason = detected
    if interpreter_requested():
        if importlib.util.find_spec("triton") is None:
            return PlatformCandidate(name, None, f"{ENV_VAR}=1 but triton is not installed (pip install 'pagedllm[triton]')")
        return PlatformCandidate(name, interpreter_class, f"Triton interpreter on CPU; GPU: {reason}", priority=0)
    if not usable:
        return PlatformCandidate(name, None, f"{reason}; interpreter: {ENV_VAR}=1")
    return PlatformCandidate(name, platform_class, reason, priority=priority)
