"""Communicator group: every collective with world size 2 in spawned processes, and the one-rank identities."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pagedllm_conformance.collectives import CHECKS, WORLD_SIZE, run_world


def _two_ranks_possible(platform: Any) -> tuple[bool, str]:
    # Processes can share a CPU; any other device type needs one device per rank.
    if platform.device_type == "cpu" or platform.device_count() >= WORLD_SIZE:
        return True, ""
    return False, (f"platform {platform.name} reports {platform.device_count()} {platform.device_type} device(s); "
                   f"world size {WORLD_SIZE} needs one device per rank")


@pytest.fixture(scope="module")
def world_results(conformance_target) -> dict[int, dict[str, Any]] | str:
    """Results of one spawned world (both ranks ran every check), or the stated reason it cannot run."""
    ok, reason = _two_ranks_possible(conformance_target.platform)
    if not ok:
        return reason
    return run_world(conformance_target.name)


@pytest.mark.parametrize("check", list(CHECKS))
def test_collective_with_two_ranks(check: str, world_results, conformance) -> None:
    """In two spawned processes, each selecting the platform through discovery and joining a process group over
    its dist_backend, the platform's Communicator gives every rank exactly the expected tensor: all_reduce,
    all_gather and reduce_scatter along dim 0 and the last dim, broadcast from either rank, send/recv both ways,
    barrier."""
    if isinstance(world_results, str):
        conformance.skip_stated(world_results)
    conformance.note(check=check, description=CHECKS[check][0], world_size=WORLD_SIZE)
    for rank in range(WORLD_SIZE):
        results = world_results[rank]
        if "__setup__" in results:
            raise AssertionError(f"rank {rank} could not run the collectives: {results['__setup__']['error']}")
        r = results[check]
        if "error" in r:
            raise AssertionError(f"rank {rank}: {check} raised {r['error']}")
        if not r["ok"]:
            raise AssertionError(f"rank {rank}: {check} returned shape {r['got_shape']}, expected {r['expected_shape']}")
        conformance.assert_error_within(r["max_abs_err"], r["magnitude"], dtype=torch.float32, group="communicator",
                                        what=f"rank {rank}: {check} (got {r['got']}..., expected {r['expected']}...)")


def test_single_rank_collectives_are_identity(conformance_target, conformance) -> None:
    """Without a process group (world size 1) every collective of the platform's Communicator returns its input."""
    p = conformance_target.platform
    comm = p.communicator(None)
    conformance.assert_equal_values((comm.world_size, comm.rank), (1, 0), what="world size and rank without a group")
    x = torch.arange(24, dtype=torch.float32, device=p.device(0)).reshape(4, 6)
    for name, out in (
        ("all_reduce", comm.all_reduce(x.clone())),
        ("all_gather", comm.all_gather(x.clone(), dim=-1)),
        ("reduce_scatter", comm.reduce_scatter(x.clone(), dim=0)),
        ("broadcast", comm.broadcast(x.clone(), src=0)),
    ):
        conformance.assert_exact(out.cpu(), x.cpu(), dtype=torch.float32, what=f"one-rank {name}")
    comm.barrier()
