"""EngineCore: the engine loop's state (scheduler + KV cache manager + executor) and its one-step method."""

from __future__ import annotations

import time
from concurrent.futures import Future

from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Sequence
from pagedllm.core.scheduler import Scheduler, StepResult
from pagedllm.engine.types import EngineCoreOutput, EngineCoreRequest, EngineCoreStats
from pagedllm.platforms.platform import Platform
from pagedllm.structured.manager import StructuredOutputManager
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
        self.structured = StructuredOutputManager(
            config.structured_outputs.backend,
            self.tokenizer_info.tokenizer,
            self.tokenizer_info.vocab_size,
            self.tokenizer_info.eos_token_ids,
            max_model_len=self.max_model_len,
        )
        # Constrained requests whose grammar is still compiling: (future, sequences), in arrival order.
        self._awaiting_grammar: list[tuple[Future, list[Sequence]]] = []

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
        if req.request_id in self.scheduler.requests or any(
            w[1][0].request_id == req.request_id for w in self._awaiting_grammar
        ):
            self.scheduler.reject(seqs[0], f"request id {req.request_id!r} is already running")
            return
        if params.structured_outputs is not None:
            # Compiled off the loop; the request joins the scheduler when its grammar is ready.
            self._awaiting_grammar.append((self.structured.submit(params.structured_outputs), seqs))
            return
        self.scheduler.add_sequences(seqs)

    def _admit_compiled(self) -> None:
        """Queue the constrained requests whose grammar finished compiling (failed ones finish with an error)."""
        still: list[tuple[Future, list[Sequence]]] = []
        for fut, seqs in self._awaiting_grammar:
            if not fut.done():
                still.append((fut, seqs))
                continue
            try:
                self.structured.attach(seqs, fut.result())
            except Exception as exc:  # admission validated the constraint; this is the library's refusal
                self.structured.release_request(seqs[0].request_id)
                for s in seqs:
                    self.scheduler.reject(s, f"structured outputs: {exc}")
                continue
            self.scheduler.add_sequences(seqs)
        self._awaiting_grammar = still

    def abort_requests(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.scheduler.abort(rid)
            self.structured.release_request(rid)
        if self._awaiting_grammar:
            gone = set(request_ids)
            self._awaiting_grammar = [w for w in self._awaiting_grammar if w[1][0].request_id not in gone]

    def step(self) -> list[EngineCoreOutput]:
        """Schedule, execute (forward + sample), update: one engine iteration."""
        t0 = time.perf_counter()
        if self._awaiting_grammar:
            self._admit_compiled()
        scheduled = self.scheduler.schedule()
        if scheduled.scheduled:
            scheduled.structured = self.structured.step_bitmask(scheduled)
            result = self.executor.execute_model(scheduled)
            self.structured.accept(scheduled, result.sampled)
        else:
            result = StepResult()
            # Only compiling requests are left: wait for one briefly instead of spinning.
            self.structured.wait_any([f for f, _ in self._awaiting_grammar], timeout=0.005)
        outputs = self.scheduler.update(scheduled, result)
        for o in outputs:
            if o.finish_reason is not None:
                self.structured.release(o.request_id, o.index)
        if self.kv_events is not None:
            self.kv_events.publish()
        self._step_time_s += time.perf_counter() - t0
        self._num_steps += 1
        return outputs

    def check_health(self) -> None:
        """Raise if the executor lost a worker (EngineDeadError); cheap enough to call while idle."""
        self.executor.check_health()

    def shutdown(self) -> None:
        """Stop the executor's workers (a uniprocess executor has none)."""
        self.executor.shutdown()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._awaiting_grammar)

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
