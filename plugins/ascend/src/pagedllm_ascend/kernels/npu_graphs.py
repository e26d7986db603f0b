"""Decode-step capture on Ascend NPUs: torch_npu's graph API (NPUGraph), as the CUDA backend uses CUDA graphs.

The model runner's ``decode_step_for_capture(n)`` contract and the replay logic are the core's
(:class:`pagedllm.kernels.triton.cuda_graphs.DecodeGraphRunner`); only the capture calls differ:
``torch.npu.NPUGraph``, ``torch.npu.graph`` and NPU streams instead of their torch.cuda twins.
"""

from __future__ import annotations

import logging

import torch
from pagedllm.kernels.triton.cuda_graphs import DecodeGraphRunner

logger = logging.getLogger(__name__)


class NpuDecodeGraphRunner(DecodeGraphRunner):
    """Captured decode steps on an NPU, one graph per padded batch size, sharing one memory pool."""

    def capture(self) -> None:
        npu = torch.npu  # present once torch_npu is imported (the platform did so)
        pool = None
        for size in reversed(self.batch_sizes):
            # Warm-up on a side stream: triton-ascend compiles here, never inside capture.
            stream = npu.Stream()
            stream.wait_stream(npu.current_stream())
            with npu.stream(stream):
                for _ in range(self.warmup_steps):
                    self.step(size)
            npu.current_stream().wait_stream(stream)
            graph = npu.NPUGraph()
            with npu.graph(graph, pool=pool):
                output = self.step(size)
            pool = graph.pool()
            self.graphs[size] = (graph, output)
        npu.synchronize()
        logger.info("captured NPU decode graphs for batch sizes %s", self.batch_sizes)
