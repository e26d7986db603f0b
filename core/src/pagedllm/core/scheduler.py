"""The scheduler: hands each step's token budget to running sequences, then waiting ones (vLLM v1 style).

There are no prefill/decode modes. Every sequence has ``num_computed_tokens``; a step gives it
``min(num_tokens - num_computed_tokens, remaining budget)`` new tokens, so long prompts chunk
across steps, decodes get one token, and prefix-cache hits simply start further along. When
the KV cache runs out, the running sequence that sorts last (priority, then arrival) is
preempted by recompute: its blocks are freed and it rejoins the front of the waiting queue.

n > 1: a request is admitted as one sequence (index 0) carrying its n - 1 siblings. The step
that computes the last prompt token samples n tokens from that position's logits (one per
sibling, each with its own generator), then ``KVCacheManager.fork`` gives every sibling the
parent's blocks by reference; the shared partial last block is copied on the first write.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from pagedllm.config import SchedulerConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Sequence, SequenceStatus, check_stop
from pagedllm.engine.types import EngineCoreOutput
from pagedllm.outputs import PositionLogprobs


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int
    start: int  # num_computed_tokens when scheduled: the first new token's position
    samples: bool  # this step computes the last known token, so a new one is sampled


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    copy_pairs: list[tuple[int, int]]  # copy-on-write (src block, dst block), before the forward
    num_scheduled_tokens: int
    num_preempted: int = 0
    block_tables: list[list[int]] = field(default_factory=list)  # one per scheduled sequence
    # n > 1 parents whose prompt completes this step -> the siblings sampled with them.
    forks: dict[int, list[Sequence]] = field(default_factory=dict)
    # structured.step.StructuredStep: the token bitmask of the constrained sampling rows, or None.
    structured: Any = None


@dataclass(slots=True)
class StepResult:
    """What the model runner produced for a step, keyed by seq_id."""

    sampled: dict[int, int] = field(default_factory=dict)
    logprobs: dict[int, PositionLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[PositionLogprobs | None]] = field(default_factory=dict)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv_manager
        self.max_model_len = max_model_len
        self.waiting: list[Sequence] = []  # ordered: priority, then preempted first, then arrival
        self.running: list[Sequence] = []  # sorted by Sequence.sort_key
        self.requests: dict[str, list[Sequence]] = {}  # every sequence of a live request
        self.siblings: dict[int, list[Sequence]] = {}  # parent seq_id -> siblings to fork
        self.num_preemptions = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self._errored: list[Sequence] = []

    # --- queue management --------------------------------------------------------------
    def add_sequences(self, seqs: list[Sequence]) -> None:
        """Admit one request: ``seqs[0]`` is scheduled; the rest are forked from it after its prompt."""
        parent = seqs[0]
        self.requests[parent.request_id] = list(seqs)
        if len(seqs) > 1:
            self.siblings[parent.seq_id] = list(seqs[1:])
            parent.num_forks = len(seqs) - 1
        # After every waiting sequence of the same or better priority.
        keys = [s.priority for s in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, parent.priority), parent)

    def _requeue_front(self, seq: Sequence) -> None:
        keys = [s.priority for s in self.waiting]
        self.waiting.insert(bisect.bisect_left(keys, seq.priority), seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._errored)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every sequence of the request with "abort" and free what they hold."""
        seqs = self.requests.pop(request_id, None)
        if not seqs:
            return []
        for seq in seqs:
            if seq.is_finished:
                continue
            if seq.status is SequenceStatus.RUNNING:
                self.running.remove(seq)
            elif seq in self.waiting:
                self.waiting.remove(seq)
            self.kv.free(seq)
            self.siblings.pop(seq.seq_id, None)
            seq.finish("abort")
        return seqs

    # --- one step ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        pairs: list[tuple[int, int]] = []
        num_preempted = 0

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            remaining = len(seq.token_ids) - seq.num_computed_tokens
            num_new = remaining if remaining < budget else budget
            new_pairs = self.kv.allocate_slots(seq, num_new)
            while new_pairs is None:
                # The latest-sorting running sequence gives its blocks back (recompute later).
                victim = self.running[-1]
                if victim is seq and not scheduled:
                    self._fail(seq, "the sequence no longer fits in the KV cache even alone")
                    break
                self._preempt(victim)
                num_preempted += 1
                if victim is seq:
                    break
                new_pairs = self.kv.allocate_slots(seq, num_new)
            if new_pairs is None:
                break
            pairs.extend(new_pairs)
            scheduled.append(ScheduledSequence(seq, num_new, seq.num_computed_tokens, num_new == remaining))
            budget -= num_new
            i += 1

        if not num_preempted and self.waiting:
            seats = sum(s.num_seats for s in self.running)
            while self.waiting and budget > 0:
                seq = self.waiting[0]
                if seq.num_seats > self.config.max_num_seqs:
                    self.waiting.pop(0)
                    self._fail(
                        seq, f"n={seq.num_seats} samples exceed max_num_seqs={self.config.max_num_seqs}"
                    )
                    continue
                if seats + seq.num_seats > self.config.max_num_seqs:
                    break
                hits, num_hit = self.kv.get_computed_blocks(seq)
                num_new = min(seq.num_tokens - num_hit, budget)
                new_pairs = self.kv.allocate_slots(seq, num_new, hits)
                if new_pairs is None:
                    if not self.running:
                        # Every block is free or evictable and it still does not fit: it never will.
                        self.waiting.pop(0)
                        self._fail(seq, "the request needs more KV cache blocks than exist")
                        continue
                    break
                self.waiting.pop(0)
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = num_hit
                self.kv.record_lookup(seq.num_tokens, num_hit)
                seq.num_computed_tokens = num_hit
                seq.status = SequenceStatus.RUNNING
                self._insert_running(seq)
                seats += seq.num_seats
                pairs.extend(new_pairs)
                scheduled.append(
                    ScheduledSequence(seq, num_new, num_hit, num_hit + num_new == seq.num_tokens)
                )
                budget -= num_new

        return SchedulerOutput(
            scheduled=scheduled,
            copy_pairs=pairs,
            num_scheduled_tokens=self.config.max_num_batched_tokens - budget,
            num_preempted=num_preempted,
            block_tables=[self.kv.block_ids(item.seq) for item in scheduled],
            forks={
                it.seq.seq_id: self.siblings[it.seq.seq_id]
                for it in scheduled
                if it.samples and it.seq.num_forks
            },
        )

    def update(self, out: SchedulerOutput, result: StepResult) -> list[EngineCoreOutput]:
        """Advance computed tokens, append sampled ones, fork n > 1 parents, and finish what stopped."""
        outputs: list[EngineCoreOutput] = self._drain_errors()
        any_finished = False
        for item in out.scheduled:
            seq = item.seq
            if seq.is_finished:
                continue
            seq.num_computed_tokens = item.start + item.num_new_tokens
            if seq.num_prompt_tokens > item.start:
                self.prompt_tokens += min(seq.num_prompt_tokens, seq.num_computed_tokens) - item.start
            self.kv.cache_full_blocks(seq)
            chunk_logprobs = result.prompt_logprobs.get(seq.seq_id)
            if chunk_logprobs is not None:
                if seq.prompt_logprobs is None:
                    seq.prompt_logprobs = [None]
                seq.prompt_logprobs.extend(chunk_logprobs)
            if not item.samples:
                continue
            group = [seq]
            if seq.num_forks:
                group += self._fork(seq)
            for s in group:
                token = result.sampled[s.seq_id]
                s.append_token(token)
                self.generation_tokens += 1
                finished = check_stop(s, self.max_model_len)
                outputs.append(self._output(s, token, result.logprobs.get(s.seq_id), seq))
                if finished:
                    any_finished = True
                    self.kv.free(s)
                    self._forget_if_done(s)
        if any_finished:
            self.running = [s for s in self.running if not s.is_finished]
        return outputs

    # --- helpers -----------------------------------------------------------------------
    def _output(
        self, s: Sequence, token: int, logprobs: PositionLogprobs | None, parent: Sequence
    ) -> EngineCoreOutput:
        prompt_lp = None
        if parent.params.prompt_logprobs is not None and not parent.prompt_logprobs_sent and s is parent:
            prompt_lp = parent.prompt_logprobs
            parent.prompt_logprobs_sent = True
        return EngineCoreOutput(
            request_id=s.request_id,
            index=s.index,
            new_token_ids=[token],
            new_logprobs=[logprobs] if logprobs is not None else None,
            prompt_logprobs=prompt_lp,
            finish_reason=s.finish_reason,
            stop_reason=s.stop_reason,
            num_cached_tokens=s.num_cached_tokens,
        )

    def _fork(self, parent: Sequence) -> list[Sequence]:
        children = self.siblings.pop(parent.seq_id, [])
        parent.num_forks = 0
        for child in children:
            child.token_ids = list(parent.token_ids)
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_cached_tokens = parent.num_cached_tokens
            child.block_hashes = list(parent.block_hashes)
            child.prompt_logprobs_sent = True  # the request's prompt logprobs travel with sample 0 only
            child.status = SequenceStatus.RUNNING
            self.kv.fork(parent, child)
            self._insert_running(child)
        return children

    def _insert_running(self, seq: Sequence) -> None:
        keys = [s.sort_key() for s in self.running]
        self.running.insert(bisect.bisect_right(keys, seq.sort_key()), seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        if not seq.prompt_logprobs_sent:
            seq.prompt_logprobs = None
        self.num_preemptions += 1
        self._requeue_front(seq)

    def _fail(self, seq: Sequence, why: str) -> None:
        """Defensive: admission should have rejected it; finish it with "error" rather than block the queue."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        self.kv.free(seq)
        group = [seq] + self.siblings.pop(seq.seq_id, [])
        for s in group:
            s.finish(
                "error",
                error=f"request {s.request_id}: {why} ({s.num_tokens} tokens, "
                f"{self.kv.num_blocks} blocks of {self.kv.block_size})",
            )
            self._errored.append(s)

    def reject(self, seq: Sequence, why: str) -> None:
        """Finish a sequence that was never queued with "error" (reported by the next update)."""
        seq.finish("error", error=why)
        self._errored.append(seq)

    def _drain_errors(self) -> list[EngineCoreOutput]:
        outs = [
            EngineCoreOutput(
                request_id=s.request_id, index=s.index, new_token_ids=[], finish_reason="error", error=s.error
            )
            for s in self._errored
        ]
        for s in self._errored:
            self._forget_if_done(s)
        self._errored.clear()
        return outs

    def _forget_if_done(self, seq: Sequence) -> None:
        seqs = self.requests.get(seq.request_id)
        if seqs is not None and all(s.is_finished for s in seqs):
            del self.requests[seq.request_id]
