"""SamplingParams: how one request samples, validated at construction (never in the engine)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pagedllm.errors import InvalidRequestError
from pagedllm.structured.params import StructuredOutputsParams

_GREEDY_EPS = 1e-5


def _finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number, got {value!r}", param=name)


@dataclass(slots=True)
class SamplingParams:
    """Mirrors vLLM's SamplingParams. temperature 0 means greedy."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context limit
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (plus the sampled one)
    prompt_logprobs: int | None = None  # top-N logprobs per prompt token
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    # Filled by the engine from the model (generation_config / tokenizer), not by users.
    eos_token_ids: list[int] = field(default_factory=list)
    # A JSON schema / regex / choice / grammar the output must match (a StructuredOutputsParams or its dict).
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def validate(self) -> None:
        def err(msg: str, param: str) -> InvalidRequestError:
            return InvalidRequestError(msg, param=param)

        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= 128:
            raise err(f"n must be an integer in [1, 128], got {self.n!r}", "n")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            _finite(name, getattr(self, name))
        if self.temperature < 0 or self.temperature > 100:
            raise err(f"temperature must be in [0, 100], got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise err(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise err(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}", "top_k")
        if not 0 <= self.min_p <= 1:
            raise err(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if not -2 <= self.presence_penalty <= 2:
            raise err(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}", "presence_penalty")
        if not -2 <= self.frequency_penalty <= 2:
            raise err(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}", "frequency_penalty")
        if not 0 < self.repetition_penalty <= 2:
            raise err(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}", "repetition_penalty")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise err(f"seed must be an integer, got {self.seed!r}", "seed")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise err("seed must fit in 64 bits", "seed")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1
        ):
            raise err(f"max_tokens must be a positive integer, got {self.max_tokens!r}", "max_tokens")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise err(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise err(f"min_tokens {self.min_tokens} exceeds max_tokens {self.max_tokens}", "min_tokens")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise err("stop must be a list of non-empty strings", "stop")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise err("stop_token_ids must be non-negative integers", "stop_token_ids")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 20):
                raise err(f"{name} must be an integer in [0, 20], got {v!r}", name)
        if self.logit_bias is not None:
            for tok, bias in self.logit_bias.items():
                if not isinstance(tok, int) or tok < 0:
                    raise err(f"logit_bias keys must be token ids, got {tok!r}", "logit_bias")
                _finite("logit_bias", bias)
                if not -100 <= bias <= 100:
                    raise err(f"logit_bias values must be in [-100, 100], got {bias}", "logit_bias")

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids must exist in the model's vocabulary; checked at admission."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", list(self.logit_bias or {}))):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"{name} contains token id {bad[0]} outside the vocabulary (size {vocab_size})", param=name
                )
