"""Executors: where the ModelRunner lives (uni: in this process; mp: a process per rank; ray: actors)."""

from __future__ import annotations

from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler import SchedulerOutput, StepResult
from pagedllm.errors import ConfigError
from pagedllm.platforms.platform import Platform


class UniProcExecutor:
    """Runs the ModelRunner in the engine's own process, on one device."""

    def __init__(self, config: EngineConfig, platform: Platform) -> None:
        from pagedllm.worker.model_runner import (
            ModelRunner,  # imports the model graph; not needed to validate
        )

        self.runner = ModelRunner(config, platform)

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def tokenizer_info(self):
        return self.runner.tokenizer_info

    @property
    def model_time_s(self) -> float:
        return self.runner.model_time_s

    def execute_model(self, out: SchedulerOutput) -> StepResult:
        return self.runner.execute_model(out)

    def check_health(self) -> None:
        """Nothing to check: the runner lives in this process."""

    def shutdown(self) -> None:
        """Nothing to stop."""


def make_executor(config: EngineConfig, platform: Platform) -> Any:
    """The executor the parallel config asks for (see ParallelConfig.executor_backend)."""
    par = config.parallel
    backend = par.executor_backend
    if par.pipeline_parallel_size > 1 and par.tensor_parallel_size > 1:
        raise ConfigError(
            "tensor and pipeline parallelism together are not supported yet; use one of them",
            param="pipeline_parallel_size",
        )
    if backend == "uni" or platform.runs_tensor_parallel_in_process(config):
        return UniProcExecutor(config, platform)
    if backend == "mp":
        from pagedllm.worker.mp_executor import MultiprocExecutor

        return MultiprocExecutor(config, platform)
    from pagedllm.worker.ray_executor import RayExecutor  # imports ray: an optional extra

    return RayExecutor(config, platform)
