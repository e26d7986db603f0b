"""LLMEngine: the in-process engine behind the offline API (InputProcessor -> EngineCore -> OutputProcessor)."""

from __future__ import annotations

from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.engine.engine_args import EngineArgs
from pagedllm.engine.engine_core import EngineCore
from pagedllm.engine.input_processor import InputProcessor
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.outputs import RequestOutput
from pagedllm.platforms.platform import Platform
from pagedllm.sample.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig, platform: Platform | None = None) -> None:
        self.engine_core = EngineCore(config, platform)
        self.config = self.engine_core.config
        self.tokenizer_info = self.engine_core.tokenizer_info
        self.input_processor = InputProcessor(self.config, self.tokenizer_info, self.engine_core.num_blocks)
        self.output_processor = OutputProcessor(self.tokenizer_info.tokenizer)

    @classmethod
    def from_engine_args(cls, platform: Platform | str | None = None, **kwargs: Any) -> LLMEngine:
        """vLLM-like kwargs: model, dtype, max_model_len, block_size, ...; ``platform`` is a name or a Platform."""
        if isinstance(platform, Platform):
            return cls(EngineArgs.from_kwargs(**kwargs).create_engine_config(), platform)
        return cls(EngineArgs.from_kwargs(platform=platform, **kwargs).create_engine_config())

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        add_special_tokens: bool = True,
    ) -> None:
        req = self.input_processor.process(
            request_id,
            prompt,
            params,
            arrival_time,
            priority,
            cache_salt,
            add_special_tokens=add_special_tokens,
        )
        self.add_processed_request(req)

    def add_processed_request(self, req) -> None:
        self.output_processor.add_request(req)
        self.engine_core.add_request(req)

    def step(self) -> list[RequestOutput]:
        outputs, stopped = self.output_processor.process_outputs(self.engine_core.step())
        if stopped:  # stop strings are found by the frontend; the core must drop those requests
            self.engine_core.abort_requests(stopped)
        return outputs

    def abort_request(self, request_ids: str | list[str]) -> list[RequestOutput]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.engine_core.abort_requests(ids)
        finals = [self.output_processor.abort_request(rid) for rid in ids]
        return [o for o in finals if o is not None]

    def has_unfinished_requests(self) -> bool:
        return self.engine_core.has_unfinished_requests()

    def get_tokenizer(self):
        return self.tokenizer_info.tokenizer
