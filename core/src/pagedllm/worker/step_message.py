"""What one step broadcast to every worker carries, and how workers rebuild the schedule from it.

The engine process owns the scheduler's ``Sequence`` objects; worker processes keep a mirror of
each running sequence (its tokens, sampling parameters and, on the driver rank, its generator).
A step message carries only the change: sequences seen for the first time (their parameters
and generator state), the new tokens of every scheduled sequence, forks and the sequences that
finished. Pickled once and published once per step, whatever the world size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pagedllm.core.request import Sequence
from pagedllm.core.scheduler import ScheduledSequence, SchedulerOutput


@dataclass(slots=True)
class NewSequence:
    """A sequence a worker has not seen yet: everything but its tokens."""

    seq_id: int
    request_id: str
    index: int
    num_prompt_tokens: int
    params: Any  # SamplingParams
    generator_state: torch.Tensor | None  # the engine-side generator's state, never yet used


@dataclass(slots=True)
class StepItem:
    """One scheduled sequence: the worker's tokens from ``offset`` on become ``token_ids``."""

    seq_id: int
    start: int
    num_new_tokens: int
    samples: bool
    offset: int  # 0 for a sequence sent in full, else ``start``
    token_ids: list[int]
    wants_prompt_logprobs: bool = False


@dataclass(slots=True)
class StepMessage:
    items: list[StepItem]
    block_tables: list[list[int]]
    copy_pairs: list[tuple[int, int]]
    num_scheduled_tokens: int
    new_sequences: list[NewSequence] = field(default_factory=list)
    forks: dict[int, list[NewSequence]] = field(default_factory=dict)  # parent seq_id -> siblings
    freed: list[int] = field(default_factory=list)  # finished sequences workers may forget
    structured: Any = None  # structured.step.StructuredStep (host tensors) or None


def _describe(seq: Sequence) -> NewSequence:
    gen = seq.generator
    return NewSequence(
        seq_id=seq.seq_id,
        request_id=seq.request_id,
        index=seq.index,
        num_prompt_tokens=seq.num_prompt_tokens,
        params=seq.params,
        generator_state=None if gen is None else gen.get_state(),
    )


class StepEncoder:
    """Engine side: turns each SchedulerOutput into the smallest StepMessage the workers can apply."""

    def __init__(self) -> None:
        self.known: dict[int, Sequence] = {}

    def encode(self, out: SchedulerOutput) -> StepMessage:
        freed = [sid for sid, seq in self.known.items() if seq.is_finished]
        for sid in freed:
            del self.known[sid]
        new: list[NewSequence] = []
        items: list[StepItem] = []
        for it in out.scheduled:
            seq = it.seq
            end = it.start + it.num_new_tokens
            if seq.seq_id in self.known:
                offset = it.start
            else:
                self.known[seq.seq_id] = seq
                new.append(_describe(seq))
                offset = 0
            items.append(
                StepItem(
                    seq.seq_id,
                    it.start,
                    it.num_new_tokens,
                    it.samples,
                    offset,
                    seq.token_ids[offset:end],
                    seq.wants_prompt_logprobs,
                )
            )
        forks: dict[int, list[NewSequence]] = {}
        for parent, siblings in out.forks.items():
            forks[parent] = [_describe(s) for s in siblings]
            for s in siblings:
                self.known[s.seq_id] = s
        return StepMessage(
            items=items,
            block_tables=out.block_tables,
            copy_pairs=out.copy_pairs,
            num_scheduled_tokens=out.num_scheduled_tokens,
            new_sequences=new,
            forks=forks,
            freed=freed,
            structured=out.structured,
        )


class StepDecoder:
    """Worker side: the mirrored sequences, and the SchedulerOutput a ModelRunner runs."""

    def __init__(self, make_generator: Any) -> None:
        self.seqs: dict[int, Sequence] = {}
        self._make_generator = make_generator  # seed -> torch.Generator on this rank's device

    def _mirror(self, d: NewSequence, token_ids: list[int]) -> Sequence:
        gen = None
        if d.generator_state is not None:
            gen = self._make_generator(0)
            gen.set_state(d.generator_state)
        return Sequence(
            request_id=d.request_id,
            index=d.index,
            token_ids=token_ids,
            num_prompt_tokens=d.num_prompt_tokens,
            params=d.params,
            arrival_time=0.0,
            generator=gen,
            seq_id=d.seq_id,
        )

    def decode(self, msg: StepMessage) -> SchedulerOutput:
        for sid in msg.freed:
            self.seqs.pop(sid, None)
        for d in msg.new_sequences:
            self.seqs[d.seq_id] = self._mirror(d, [])
        scheduled: list[ScheduledSequence] = []
        for it in msg.items:
            seq = self.seqs[it.seq_id]
            toks = seq.token_ids
            if it.offset > len(toks):
                raise RuntimeError(
                    f"step for sequence {it.seq_id} starts at token {it.offset} but this worker has {len(toks)}"
                )
            del toks[it.offset :]
            toks.extend(it.token_ids)
            seq.prompt_logprobs_sent = not it.wants_prompt_logprobs
            scheduled.append(ScheduledSequence(seq, it.num_new_tokens, it.start, it.samples))
        forks: dict[int, list[Sequence]] = {}
        for parent, siblings in msg.forks.items():
            base = self.seqs[parent].token_ids
            forks[parent] = []
            for d in siblings:
                self.seqs[d.seq_id] = mirror = self._mirror(d, list(base))
                forks[parent].append(mirror)
        return SchedulerOutput(
            scheduled=scheduled,
            copy_pairs=msg.copy_pairs,
            num_scheduled_tokens=msg.num_scheduled_tokens,
            block_tables=msg.block_tables,
            forks=forks,
            structured=msg.structured,
        )
