"""Counting XLA compilations from torch-xla's metrics: warm-up's total, and any while serving.

A compilation after warm-up means a shape no bucket covered reached the device: a multi-second
stall on a TPU or a Neuron core. It is logged as a warning naming the shape, never silent.
"""

from __future__ import annotations

import logging

import torch_xla.debug.metrics as met

logger = logging.getLogger(__name__)


def compile_count() -> int:
    """How many graphs torch-xla has compiled in this process (its CompileTime metric)."""
    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


class CompileWatch:
    """Remembers the count when the engine became ready and warns on every step that compiles."""

    def __init__(self) -> None:
        self.ready_count: int | None = None
        self.last_count = compile_count()
        self.warmup_graphs = 0

    def mark_ready(self, warmup_start: int) -> None:
        self.last_count = self.ready_count = compile_count()
        self.warmup_graphs = self.ready_count - warmup_start

    @property
    def since_ready(self) -> int:
        return 0 if self.ready_count is None else compile_count() - self.ready_count

    def check(self, shape: str) -> int:
        """New compilations since the last check; warns (once per step) when serving compiled."""
        now = compile_count()
        new, self.last_count = now - self.last_count, now
        if new and self.ready_count is not None:
            logger.warning(
                "XLA compiled %d new graph(s) while serving, for a step of shape %s: that shape is not "
                "covered by warm-up (a stall of seconds on a TPU/Neuron device; please report it)",
                new, shape,
            )
        return new
