"""Collectives run in spawned ranks: each rank selects the platform by name and checks the platform's Communicator."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing as mp
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

WORLD_SIZE = 2

# name -> (description, check). A check gets (communicator, rank, world_size, device) and returns
# (got, expected) tensors for this rank. Inputs are small integers, so the default tolerance is exact.
Check = Callable[[Any, int, int, torch.device], tuple[torch.Tensor, torch.Tensor]]


def _base(device: torch.device, *shape: int) -> torch.Tensor:
    return torch.arange(int(torch.tensor(shape).prod()), dtype=torch.float32, device=device).reshape(shape)


def _all_reduce(comm: Any, rank: int, ws: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = _base(device, 3, 5) * (rank + 1)
    got = comm.all_reduce(x)
    return got, _base(device, 3, 5) * sum(r + 1 for r in range(ws))


def _all_gather(dim: int) -> Check:
    def check(comm: Any, rank: int, ws: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        got = comm.all_gather(_base(device, 2, 3) + 100 * rank, dim=dim)
        return got, torch.cat([_base(device, 2, 3) + 100 * r for r in range(ws)], dim=dim)

    return check


def _reduce_scatter(dim: int) -> Check:
    def check(comm: Any, rank: int, ws: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x = _base(device, 4, 6) * (rank + 1)
        got = comm.reduce_scatter(x, dim=dim)
        total = _base(device, 4, 6) * sum(r + 1 for r in range(ws))
        return got, total.chunk(ws, dim=dim)[rank].contiguous()

    return check


def _broadcast(src: int) -> Check:
    def check(comm: Any, rank: int, ws: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        got = comm.broadcast(_base(device, 7) + 10 * rank, src=src)
        return got, _base(device, 7) + 10 * src

    return check


def _send_recv(comm: Any, rank: int, ws: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Rank 0 sends to 1, then 1 answers with the message doubled: both directions are exercised.
    msg = _base(device, 2, 4) + 0.5
    if rank == 0:
        comm.send(msg.clone(), dst=1)
        got = comm.recv(torch.zeros_like(msg), src=1)
        return got, msg * 2
    got = comm.recv(torch.zeros_like(msg), src=0)
    comm.send(got * 2, dst=0)
    return got, msg


def _barrier(comm: Any, rank: int, ws: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    comm.barrier()
    return torch.tensor([comm.rank, comm.world_size]), torch.tensor([rank, ws])


CHECKS: dict[str, tuple[str, Check]] = {
    "all_reduce": ("all_reduce sums every rank's tensor", _all_reduce),
    "all_gather_dim0": ("all_gather concatenates along dim 0 in rank order", _all_gather(0)),
    "all_gather_dim-1": ("all_gather concatenates along the last dim in rank order", _all_gather(-1)),
    "reduce_scatter_dim0": ("reduce_scatter sums, then keeps this rank's slice of dim 0", _reduce_scatter(0)),
    "reduce_scatter_dim-1": ("reduce_scatter sums, then keeps this rank's slice of the last dim", _reduce_scatter(-1)),
    "broadcast_src0": ("broadcast from rank 0 reaches every rank", _broadcast(0)),
    "broadcast_src1": ("broadcast from rank 1 reaches every rank", _broadcast(1)),
    "send_recv": ("send/recv deliver a tensor in both directions", _send_recv),
    "barrier_and_ranks": ("barrier returns; the communicator knows its rank and world size", _barrier),
}


def rank_main(rank: int, world_size: int, platform_name: str, init_method: str, out_dir: str) -> None:
    """Entry point of one spawned rank; writes rank<N>.json with one result per check."""
    results: dict[str, Any] = {}
    try:
        from pagedllm.platforms.discovery import register_plugin, select_platform

        selection = select_platform(platform_name)
        register_plugin(selection)
        platform = selection.platform
        platform.set_device(rank)
        dist.init_process_group(backend=platform.dist_backend, init_method=init_method, rank=rank,
                                world_size=world_size, timeout=dt.timedelta(seconds=120))
        comm = platform.communicator(None)
        device = platform.device(rank)
        for name, (_, check) in CHECKS.items():
            try:
                got, expected = check(comm, rank, world_size, device)
                platform.synchronize()
                got, expected = got.detach().cpu(), expected.detach().cpu()
                same_shape = got.shape == expected.shape
                err = float((got.double() - expected.double()).abs().max()) if same_shape else None
                results[name] = {"ok": same_shape, "max_abs_err": err, "magnitude": float(expected.abs().max()),
                                 "got_shape": list(got.shape),
                                 "expected_shape": list(expected.shape),
                                 "got": got.flatten()[:8].tolist(), "expected": expected.flatten()[:8].tolist()}
            except Exception as exc:
                results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        results["__setup__"] = {"ok": False, "error": traceback.format_exc(limit=6)}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(platform_name: str, timeout_s: float = 300.0) -> dict[int, dict[str, Any]]:
    """Spawn WORLD_SIZE ranks and collect their results; a hung or crashed rank is reported, not waited on."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="pagedllm-conformance-") as out_dir:
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        procs = [ctx.Process(target=rank_main, args=(r, WORLD_SIZE, platform_name, init_method, out_dir))
                 for r in range(WORLD_SIZE)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        results: dict[int, dict[str, Any]] = {}
        for rank, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join(5)
                results[rank] = {"__setup__": {"ok": False, "error": f"rank {rank} did not finish in {timeout_s:.0f} s"}}
                continue
            path = Path(out_dir, f"rank{rank}.json")
            if not path.exists():
                results[rank] = {"__setup__": {"ok": False, "error": f"rank {rank} exited with {p.exitcode} and no result"}}
                continue
            results[rank] = json.loads(path.read_text())
        return results
