"""LaunchConfig: the block sizes and scheduling knobs a plugin chooses for one kernel."""

from __future__ import annotations

from dataclasses import dataclass


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    """How to launch one kernel on one vendor's hardware.

    block_m: rows per program (attention: query rows, i.e. query tokens x heads of one KV group).
    block_n: columns per inner step (attention: keys per KV tile; elementwise: features per program).
    num_warps: warps (NVIDIA, 32 lanes) or wavefronts (AMD, 64 lanes) per program.
    num_stages: software-pipelining depth of the inner loop (1 = none).
    """

    block_m: int = 16
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self) -> None:
        for field_name in ("block_m", "block_n", "num_warps"):
            value = getattr(self, field_name)
            if not _is_pow2(value):
                raise ValueError(f"LaunchConfig.{field_name} must be a power of two, got {value}")
        if self.num_stages < 1:
            raise ValueError(f"LaunchConfig.num_stages must be >= 1, got {self.num_stages}")

    def launch_kwargs(self) -> dict[str, int]:
        """The keyword arguments every Triton launch takes."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}
