"""CpuCommunicator: collectives between CPU worker processes over gloo.

The core's Communicator already does everything gloo can: all_reduce, all_gather along any dim,
broadcast, send/recv and barrier map one-to-one, and reduce_scatter uses gloo's native
reduce_scatter (torch >= 2.6), falling back to all_reduce + slice on older gloo builds. Nothing
here is faster on a CPU, so this subclass exists for the shared plugin shape and overrides
nothing; tests/test_communicator.py checks every collective across two gloo processes.
"""

from __future__ import annotations

from pagedllm.plugin import Communicator


class CpuCommunicator(Communicator):
    """Collectives for one gloo process group (the base implementation, verified on gloo)."""
