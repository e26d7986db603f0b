"""Sequence: the unit the scheduler and KV cache manager work on (one sample of one request)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from pagedllm.outputs import PositionLogprobs
from pagedllm.sample.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_SEQ_COUNTER = itertools.count()


@dataclass(slots=True, eq=False)
class Sequence:
    """One sample of a request: its tokens, how many of them are in the KV cache, and why it stopped.

    A request with ``n > 1`` starts as a single sequence (index 0) that still owes ``num_forks``
    siblings; when its prompt is computed the scheduler forks it into n sequences that share the
    prompt's blocks (see ``KVCacheManager.fork``).
    """

    request_id: str
    index: int
    token_ids: list[int]  # prompt followed by the generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    arrival_time: float
    priority: int = 0
    cache_salt: str | None = None
    generator: torch.Generator | None = None
    num_forks: int = 0  # siblings still to be created when the prompt completes (n - 1)
    num_computed_tokens: int = 0  # tokens whose keys/values are in the KV cache
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache on first admission
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    # Prompt logprobs gathered chunk by chunk; sent once, with the first generated token.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    prompt_logprobs_sent: bool = False
    num_preemptions: int = 0
    # Chained prefix-cache hashes of the full blocks of token_ids, extended as blocks fill.
    block_hashes: list = field(default_factory=list)
    seq_id: int = field(default_factory=lambda: next(_SEQ_COUNTER))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and not self.prompt_logprobs_sent

    @property
    def num_seats(self) -> int:
        """Running slots this sequence will occupy once forked (it counts against max_num_seqs)."""
        return 1 + self.num_forks

    def sort_key(self) -> tuple[int, float, int]:
        """Lower runs first; the highest key is the first to be preempted."""
        return (self.priority, self.arrival_time, self.seq_id)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def finish(self, reason: str, stop_reason: int | str | None = None, error: str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.error = error


def check_stop(seq: Sequence, max_model_len: int) -> bool:
    """Finish ``seq`` if its last token ends it: EOS / stop token ("stop"), max_tokens or context ("length")."""
    params = seq.params
    last = seq.token_ids[-1]
    num_out = seq.num_output_tokens
    if num_out >= params.min_tokens:
        if not params.ignore_eos and last in params.eos_token_ids:
            seq.finish("stop", stop_reason=None)
            return True
        if last in params.stop_token_ids:
            seq.finish("stop", stop_reason=last)
            return True
    if params.max_tokens is not None and num_out >= params.max_tokens:
        seq.finish("length")
        return True
    if seq.num_tokens >= max_model_len:
        seq.finish("length")
        return True
    return False
