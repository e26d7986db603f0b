"""The Ray executor: ranks as Ray actors placed by a placement group, on this machine or across a Ray cluster.

Ray is an optional extra (``pip install 'pagedllm[ray]'``); this module is imported only when
``--distributed-executor-backend ray`` is chosen. The engine connects to the Ray cluster the usual
way (``RAY_ADDRESS``, or the cluster ``ray start --head`` started on this machine), else starts a
local one. Each rank runs the same loop as a multiprocess rank (``worker.run_worker``), talking ZMQ
over TCP to the engine's node; a dead actor fails the engine exactly like a dead process.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.errors import ConfigError
from pagedllm.platforms.platform import Platform
from pagedllm.worker.mp_executor import DistributedExecutor, free_port
from pagedllm.worker.worker import WorkerArgs, platform_class_path, run_worker

logger = logging.getLogger(__name__)

# Environment the ranks need from the engine's process (Ray starts actors with the raylet's environment).
_ENV_PREFIXES = ("PAGEDLLM_", "OMP_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")
PLACEMENT_STRATEGY_ENV = "PAGEDLLM_RAY_PLACEMENT"  # PACK (default), SPREAD, STRICT_PACK, STRICT_SPREAD


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--distributed-executor-backend ray needs Ray: pip install 'pagedllm[ray]'",
            param="distributed_executor_backend",
        ) from None
    return ray


class _RankActor:
    """One rank; ``run`` blocks for the rank's lifetime (the actor's only task)."""

    def address(self) -> tuple[str, int, str]:
        """(node IP, a free port there, Ray node id) of this actor."""
        import ray

        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip), ray.get_runtime_context().get_node_id()

    def run(self, args: WorkerArgs) -> int:
        logging.basicConfig(level=os.environ.get("PAGEDLLM_LOG_LEVEL", "INFO"))
        os.environ.setdefault("PAGEDLLM_NO_PROGRESS", "1")
        return run_worker(args)


class RayExecutor(DistributedExecutor):
    def __init__(self, config: EngineConfig, platform: Platform) -> None:
        self._ray = _import_ray()
        self.actors: list[Any] = []
        self.refs: list[Any] = []
        self.placement_group: Any = None
        super().__init__(config, platform)

    def _bind(self, pub: Any, pull: Any) -> tuple[str, str]:
        ray = self._ray
        if not ray.is_initialized():
            ray.init(logging_level=logging.WARNING)
        ip = ray.util.get_node_ip_address()
        step = pub.bind_to_random_port(f"tcp://{ip}")
        result = pull.bind_to_random_port(f"tcp://{ip}")
        return f"tcp://{ip}:{step}", f"tcp://{ip}:{result}"

    def _start_workers(self) -> None:
        ray = self._ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        device = "CPU" if self.platform.device_type == "cpu" else "GPU"
        bundle = {device: 1.0} if device == "GPU" else {"CPU": 1.0}
        strategy = os.environ.get(PLACEMENT_STRATEGY_ENV, "PACK")
        self.placement_group = ray.util.placement_group([dict(bundle)] * self.world_size, strategy=strategy)
        if not ray.get(self.placement_group.ready(), timeout=120):
            raise ConfigError(f"Ray could not place {self.world_size} ranks of {bundle}")
        env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
        cls = ray.remote(_RankActor)
        for rank in range(self.world_size):
            self.actors.append(
                cls.options(
                    num_cpus=bundle.get("CPU", 0),
                    num_gpus=bundle.get("GPU", 0),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self.placement_group, placement_group_bundle_index=rank
                    ),
                    runtime_env={"env_vars": env},
                ).remote()
            )
        places = ray.get([a.address.remote() for a in self.actors], timeout=300)
        self.node_ids = [node for _, _, node in places]
        ip, port, _ = places[0]
        for rank, actor in enumerate(self.actors):
            args = WorkerArgs(
                config=self.config,
                rank=rank,
                world_size=self.world_size,
                local_rank=0,  # Ray gives each actor its own device (CUDA_VISIBLE_DEVICES and the like)
                dist_init_method=f"tcp://{ip}:{port}",
                step_address=self.step_address,
                result_address=self.result_address,
                parent_pid=None,  # actors are fate-shared with this driver by Ray
                platform_class=platform_class_path(self.platform),
            )
            self.refs.append(actor.run.remote(args))

    def _dead_ranks(self) -> list[tuple[int, str]]:
        ray = self._ray
        done, _ = ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)
        dead = []
        for rank, ref in enumerate(self.refs):
            if ref in done:
                try:
                    why = f"exited with code {ray.get(ref)}"
                except Exception as exc:  # the actor died: RayActorError and the like
                    why = f"died ({type(exc).__name__})"
                dead.append((rank, why))
        return dead

    def _stop_workers(self, graceful: bool) -> None:
        ray = self._ray
        if graceful and self.refs:
            ray.wait(list(self.refs), num_returns=len(self.refs), timeout=10)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)
            self.placement_group = None
        self.actors, self.refs = [], []

    @property
    def worker_pids(self) -> list[int]:
        return [info.pid for info in self.rank_info]


