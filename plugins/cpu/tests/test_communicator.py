"""CpuCommunicator: every collective across two gloo processes, and identity at world size 1."""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pagedllm_cpu.communicator import CpuCommunicator
from pagedllm_cpu.platform import CpuPlatform


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, errors: mp.Queue) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group(CpuPlatform.dist_backend, rank=rank, world_size=2)
        comm = CpuPlatform().communicator()
        assert isinstance(comm, CpuCommunicator) and comm.world_size == 2 and comm.rank == rank

        x = torch.arange(8.0).view(2, 4) + 10 * rank  # rank 0: 0..7, rank 1: 10..17
        summed = comm.all_reduce(x.clone())
        assert torch.equal(summed, torch.arange(8.0).view(2, 4) * 2 + 10)

        gathered = comm.all_gather(x, dim=-1)  # [2, 8]: rank 0's columns, then rank 1's
        assert torch.equal(
            gathered, torch.cat([torch.arange(8.0).view(2, 4), torch.arange(8.0).view(2, 4) + 10], -1)
        )

        scattered = comm.reduce_scatter(x, dim=-1)  # this rank's 2 columns of the sum
        assert torch.equal(scattered, summed[:, 2 * rank : 2 * rank + 2])
        rows = comm.reduce_scatter(x, dim=0)
        assert torch.equal(rows, summed[rank : rank + 1])

        b = torch.full((3,), float(rank))
        assert torch.equal(comm.broadcast(b, src=1), torch.ones(3))

        if rank == 0:
            comm.send(torch.tensor([42.0]), dst=1)
        else:
            assert comm.recv(torch.zeros(1), src=0).item() == 42.0
        comm.barrier()
        dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def test_collectives_across_two_gloo_processes() -> None:
    ctx = mp.get_context("fork")  # spawn would re-import this test module by a path it cannot resolve
    errors = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, errors)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    messages = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert all(p.exitcode == 0 for p in procs), "\n".join(messages) or [p.exitcode for p in procs]


def test_single_process_collectives_are_identity() -> None:
    comm = CpuCommunicator()
    x = torch.arange(6.0).view(2, 3)
    assert comm.world_size == 1
    assert torch.equal(comm.all_reduce(x.clone()), x)
    assert torch.equal(comm.all_gather(x, dim=0), x)
    assert torch.equal(comm.reduce_scatter(x, dim=-1), x)
    assert torch.equal(comm.broadcast(x.clone()), x)
    comm.barrier()
