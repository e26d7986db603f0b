"""EngineCore: the engine loop's state (scheduler + KV cache manager + executor) and its one-step method."""

from __future__ import annotations

import time

from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Sequence
from pagedllm.core.scheduler import Scheduler, StepResult
from pagedllm.engine.types import EngineCoreOutput, EngineCoreRequest, EngineCoreStats
from pagedllm.platforms.platform import Platform
from pagedllm.worker.executor import make_executor


class EngineCore:
    def __init__(self, config: EngineConfig, platform: Platform | None = None) -> None:
        if platform is None:
            from pagedllm.platforms.discovery import current_platform

            platform = current_platform(config.device.platform)
        platform.check_and_update_config(config)
        platform.seed_everything(config.model.seed)
        self.config = config
        self.platform = platform
        self.executor = make_executor(config, platform)
        self.tokenizer_info = self.executor.tokenizer_info
        config.model.max_model_len = self.max_model_len = (
            config.model.max_model_len or self.tokenizer_info.max_model_len
        )
        config.cache.num_blocks = self.num_blocks = self.executor.num_blocks
        self.kv_cache_manager = KVCacheManager(
            self.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager, self.max_model_len)
        self.kv_events = None
        if config.kv_events is not None and config.kv_events.enable_kv_cache_events:
            from pagedllm.engine.kv_event_publisher import KVEventPublisher

            self.kv_events = KVEventPublisher(config.kv_events, self.kv_cache_manager.pool, config.cache.block_size)
        self._step_time_s = 0.0
        self._num_steps = 0

    def add_request(self, req: EngineCoreRequest) -> None:
        """Queue a validated request; n > 1 becomes n sequences sharing the prompt (see Scheduler)."""
        params = req.sampling_params
        seqs = [
            Sequence(
                request_id=req.request_id,
                index=i,
                token_ids=list(req.prompt_token_ids),
                num_prompt_tokens=len(req.prompt_token_ids),
                params=params,
                arrival_time=req.arrival_time,
                priority=req.priority,
                cache_salt=req.cache_salt,
                # vLLM's rule for n > 1 with a seed: sample i uses seed + i.
                generator=None if params.seed is None else self.platform.make_generator(params.seed + i),
            )
            for i in range(params.n)
        ]
        if req.request_id in self.scheduler.requests:
            self.scheduler.reject(seqs[0], f"request id {req.request_id!r} is already running")
            return
        self.scheduler.add_sequences(seqs)

    def abort_requests(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.scheduler.abort(rid)

    def step(self) -> list[EngineCoreOutput]:
        """Schedule, execute (forward + sample), update: one engine iteration."""
        t0 = time.perf_counter()
        scheduled = self.scheduler.schedule()
        result = self.executor.execute_model(scheduled) if scheduled.scheduled else StepResult()
        outputs = self.scheduler.update(scheduled, result)
        if self.kv_events is not None:
            self.kv_events.publish()
        self._step_time_s += time.perf_counter() - t0
        self._num_steps += 1
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def reset_prefix_cache(self) -> bool:
        done = self.kv_cache_manager.pool.reset_prefix_cache()
        if self.kv_events is not None:
            self.kv_events.publish()
        return done

    def stats(self) -> EngineCoreStats:
        usage = self.kv_cache_manager.usage()
        sched = self.scheduler
        return EngineCoreStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            kv_cache_usage=usage.usage,
            num_blocks=usage.num_blocks,
            num_free_blocks=usage.num_free_blocks,
            num_cached_blocks=usage.num_cached_blocks,
            prefix_cache_queries=usage.prefix_queries,
            prefix_cache_hits=usage.prefix_hits,
            num_preemptions=sched.num_preemptions,
            prompt_tokens=sched.prompt_tokens,
            generation_tokens=sched.generation_tokens,
            kv_waste_fraction=usage.waste,
            step_time_s=self._step_time_s,
            model_time_s=self.executor.model_time_s,
            num_steps=self._num_steps,
        )
