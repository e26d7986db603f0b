"""Tensor parallelism over two gloo ranks gives the single-rank logits (sharded loading + collectives)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from pagedllm.config import ModelConfig
from pagedllm.model.loader import load_model
from pagedllm.model.testing import ReferencePlatform, prefill_logits, tensor_parallel_prefill_worker

ARCHS = ("llama", "qwen2", "gemma2")
IDS = [(3 + 7 * i) % 256 for i in range(9)]  # longer than the gemma2 window


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_rank_tensor_parallel_logits_equal_single_rank(tiny_model_dir, tmp_path) -> None:
    jobs = [(tiny_model_dir(arch), IDS, str(tmp_path / arch)) for arch in ARCHS]
    mp.start_processes(
        tensor_parallel_prefill_worker, args=(2, _free_port(), jobs), nprocs=2, start_method="spawn"
    )
    for path, ids, out in jobs:
        single = prefill_logits(
            load_model(ModelConfig(model=path), ReferencePlatform(), 4).model, ids, block_size=4
        )
        for rank in range(2):
            torch.testing.assert_close(torch.load(f"{out}.rank{rank}"), single, atol=1e-5, rtol=0)
