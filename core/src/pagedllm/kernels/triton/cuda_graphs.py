"""Decode-step graph capture for torch.cuda devices: CUDA graphs, and HIP graphs on ROCm builds.

The model runner owns persistent input buffers and exposes ``decode_step_for_capture(n)``: one
decode forward over the first ``n`` rows of those buffers, returning the output tensor. One
graph is captured per padded batch size; a step with ``n`` sequences copies its inputs into the
buffers, then replays the graph of the smallest captured size >= n.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to max_num_seqs (capped at 512, vLLM's spread)."""
    cap = min(max_num_seqs, 512)
    sizes = [s for s in (1, 2, 4, 8) if s <= cap]
    sizes += list(range(16, cap + 1, 16))
    if sizes[-1] != cap:
        sizes.append(cap)
    return sizes


class DecodeGraphRunner:
    """Captured decode steps, one graph per padded batch size, sharing one memory pool."""

    def __init__(self, step: Callable[[int], torch.Tensor], batch_sizes: list[int], warmup_steps: int = 2) -> None:
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"capture batch sizes must be positive, got {batch_sizes}")
        self.step = step
        self.batch_sizes = sorted(set(batch_sizes))
        self.warmup_steps = warmup_steps
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def capture(self) -> None:
        """Capture largest first so smaller graphs reuse the pool the largest one allocated."""
        pool = None
        for size in reversed(self.batch_sizes):
            # Warm-up on a side stream: Triton compiles and autotunes here, never inside capture.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(self.warmup_steps):
                    self.step(size)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                output = self.step(size)
            pool = graph.pool()
            self.graphs[size] = (graph, output)
        torch.cuda.synchronize()
        logger.info("captured decode graphs for batch sizes %s", self.batch_sizes)

    def padded_size(self, num_seqs: int) -> int | None:
        """The captured size a batch of num_seqs decodes pads to, or None if it runs eagerly."""
        for size in self.batch_sizes:
            if size >= num_seqs:
                return size
        return None

    def replay(self, num_seqs: int) -> torch.Tensor:
        """Replay the graph for num_seqs (inputs already in the runner's buffers); output rows [:num_seqs]."""
        size = self.padded_size(num_seqs)
        if size is None or size not in self.graphs:
            raise ValueError(f"no decode graph captured for {num_seqs} sequences (sizes {self.batch_sizes})")
        graph, output = self.graphs[size]
        graph.replay()
        return output[:num_seqs]
