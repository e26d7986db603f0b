"""CPU op overrides: none, because no candidate beat the core's torch-native ops on a CPU.

Measured on the shared 2-core Xeon (torch 2.13, fp32, 1 thread, best of repeats):
- rms_norm / fused_add_rms_norm, [64 | 512, 576]: ``F.rms_norm`` is bit-identical and within
  noise of the native ops (126 vs 128 us at 64 rows). torch.compile fusions were not adopted:
  compiling one attention function took 85 s here and ran slower than the eager kernels.
- silu_and_mul, [64 | 512, 3072]: multiplying in place into the silu output is equal at decode
  size and ~20% faster at 512 rows, but that is an allocation saving for every device, so it
  belongs in the core's native op, not in a CPU override.
An override is worth registering only when it is measurably faster here; until then the native
ops stay, and ``pagedllm env`` shows no CPU overrides.
"""

from __future__ import annotations

from pagedllm.plugin import PluginRegistry


def register_ops(registry: PluginRegistry) -> None:
    """Register CPU op overrides (currently none; see the module docstring for why)."""
    return None
