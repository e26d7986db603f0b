"""The Ray executor on a two-node Ray cluster started by the test on this machine: TP 2 and PP 2 give world size
1's tokens, and a killed rank fails the engine. Slow: a Ray cluster start is tens of seconds here."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
from pagedllm.errors import EngineDeadError
from pagedllm.model.testing import make_tiny_model
from pagedllm.sample.sampling_params import SamplingParams

sys.path.insert(0, os.path.dirname(__file__))  # the multiprocess tests' cases, shared
from test_mp_executor import MIXED, make_core, mixed_requests, run  # noqa: E402

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'pagedllm[ray]'")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_node_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ray_tp2_and_pp2_match_world_size_1_then_a_killed_rank_fails_the_engine(two_node_cluster, tmp_path) -> None:
    model = make_tiny_model("llama", tmp_path / "llama", seed=1)
    reqs = mixed_requests(256)
    expected = run(make_core(model, 1, **MIXED), reqs)
    for tp, pp in ((2, 1), (1, 2)):
        core = make_core(model, tp, pp, distributed_executor_backend="ray", **MIXED)
        try:
            from pagedllm.worker.ray_executor import RayExecutor

            assert isinstance(core.executor, RayExecutor)
            # One rank on each Ray node (1 CPU each): the placement group spread them.
            assert len(set(core.executor.node_ids)) == 2
            assert run(core, reqs) == expected, (tp, pp)
            if pp == 1:
                continue
            from pagedllm.engine.input_processor import InputProcessor

            proc = InputProcessor(core.config, core.tokenizer_info, core.num_blocks)
            for i in range(2):
                params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
                core.add_request(proc.process(f"k{i}", [1 + i, 2, 3], params))
            core.step()
            os.kill(core.executor.worker_pids[0], signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(EngineDeadError, match="rank 0"):
                for _ in range(1000):
                    core.step()
            assert time.monotonic() - t0 < 15
        finally:
            core.shutdown()
