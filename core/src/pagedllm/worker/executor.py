"""Executors: where the ModelRunner lives. Only the uniprocess executor exists so far."""

from __future__ import annotations

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


def make_executor(config: EngineConfig, platform: Platform) -> UniProcExecutor:
    tp = config.parallel.tensor_parallel_size
    backend = config.parallel.distributed_executor_backend
    if tp > 1:
        raise ConfigError(
            f"tensor_parallel_size {tp} is not supported yet: only the uniprocess executor exists; "
            "pass --tensor-parallel-size 1",
            param="tensor_parallel_size",
        )
    if backend not in (None, "uni"):
        raise ConfigError(
            f"distributed_executor_backend {backend!r} is not supported yet; use 'uni'",
            param="distributed_executor_backend",
        )
    return UniProcExecutor(config, platform)
