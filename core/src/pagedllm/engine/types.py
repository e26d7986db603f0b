"""Messages between the frontend (input/output processors) and the EngineCore.

They are plain, picklable records so the EngineCore can live in another process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.outputs import PositionLogprobs
from pagedllm.sample.sampling_params import SamplingParams


@dataclass(slots=True)
class EngineCoreRequest:
    """A validated, tokenized request: nothing in it may make the engine loop raise."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int = 0  # lower runs first, like vLLM
    cache_salt: str | None = None  # extra key for the prefix-cache hash (tenant isolation)
    prompt: str | None = None  # original text, for outputs only


@dataclass(slots=True)
class EngineCoreOutput:
    """What one step produced for one sequence. ``index`` is the sample index for n > 1."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_logprobs: list[PositionLogprobs] | None = None  # one per new token when requested
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # sent once, with the first token
    finish_reason: str | None = None  # "stop" (eos / stop token), "length", "abort", "error"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None


@dataclass(slots=True)
class EngineCoreStats:
    """Figures for metrics and the periodic log line, taken after a step."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of blocks in use
    num_blocks: int = 0
    num_free_blocks: int = 0
    num_cached_blocks: int = 0
    prefix_cache_queries: int = 0  # cumulative tokens looked up
    prefix_cache_hits: int = 0  # cumulative tokens found
    num_preemptions: int = 0  # cumulative
    prompt_tokens: int = 0  # cumulative prompt tokens computed
    generation_tokens: int = 0  # cumulative tokens sampled
    kv_waste_fraction: float = 0.0  # allocated slots not holding a token / allocated slots
    step_time_s: float = 0.0  # cumulative time in step()
    model_time_s: float = 0.0  # cumulative time in the model forward + sampling
    num_steps: int = 0
    extra: dict = field(default_factory=dict)
