"""TensorCollectiveCommunicator gives the core Communicator's results with single-buffer collectives."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pagedllm.distributed.communicator import Communicator
from pagedllm.kernels.triton.communicator import TensorCollectiveCommunicator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(rank: int, port: int, results: dict) -> None:  # type: ignore[type-arg]
    # gloo implements the single-buffer collectives too, so the dim handling is checked on CPU.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x = torch.arange(12, dtype=torch.float32).view(2, 6) + 100 * rank  # [2, 6]
        fast, plain = TensorCollectiveCommunicator(), Communicator()
        results[rank] = {
            "gather": torch.equal(fast.all_gather(x, dim=-1), plain.all_gather(x, dim=-1)),
            "gather0": torch.equal(fast.all_gather(x, dim=0), plain.all_gather(x, dim=0)),
            "scatter": torch.equal(fast.reduce_scatter(x, dim=-1), plain.reduce_scatter(x, dim=-1)),
        }
    finally:
        dist.destroy_process_group()


def test_single_buffer_collectives_match_the_core_communicator_on_two_ranks() -> None:
    # fork, not spawn: the children inherit this test module instead of re-importing it by name.
    ctx = mp.get_context("fork")
    results, port = ctx.Manager().dict(), _free_port()
    procs = [ctx.Process(target=_ranks, args=(rank, port, results)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    assert dict(results) == {r: {"gather": True, "gather0": True, "scatter": True} for r in (0, 1)}


def test_single_rank_collectives_are_identities() -> None:
    x = torch.randn(2, 4)
    comm = TensorCollectiveCommunicator()
    assert comm.all_gather(x) is x and comm.reduce_scatter(x) is x
