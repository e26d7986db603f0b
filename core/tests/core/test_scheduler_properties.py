"""Property-based: over random sequences of admissions (shared prefixes, n > 1), steps, aborts and the
preemptions a small pool forces, no KV block is leaked or freed twice, every block's reference count
is exactly the number of live block tables holding it, the prefix-cache index stays consistent, and
once everything is finished or aborted every block is free again."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from pagedllm.config import SchedulerConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Sequence
from pagedllm.core.scheduler import Scheduler, StepResult
from pagedllm.sample.sampling_params import SamplingParams

BLOCK_SIZE = 4
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9], [5, 6, 7]]


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(6, 40), budget=st.sampled_from([8, 16, 64]),
                max_num_seqs=st.integers(1, 6), caching=st.booleans())
    def setup(self, num_blocks: int, budget: int, max_num_seqs: int, caching: bool) -> None:
        self.kv = KVCacheManager(num_blocks, BLOCK_SIZE, caching)
        self.sched = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
                               self.kv, max_model_len=64)
        self.next_id = 0
        self.live: list[str] = []
        self.finished: set[str] = set()

    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(10, 40), max_size=9),
          n=st.integers(1, 3), max_tokens=st.integers(1, 10))
    def add(self, prefix: list[int], tail: list[int], n: int, max_tokens: int) -> None:
        prompt = prefix + tail
        # Admission (the InputProcessor) rejects what can never fit; mirror it so only fitting requests come in.
        if self.kv.blocks_needed(len(prompt) + max_tokens) * n > self.kv.num_blocks:
            return
        rid = f"r{self.next_id}"
        self.next_id += 1
        params = SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True)
        self.sched.add_sequences([
            Sequence(request_id=rid, index=i, token_ids=list(prompt), num_prompt_tokens=len(prompt), params=params,
                     arrival_time=float(self.next_id))
            for i in range(n)
        ])
        self.live.append(rid)

    @precondition(lambda self: self.sched.has_unfinished())
    @rule()
    def step(self) -> None:
        out = self.sched.schedule()
        res = StepResult()
        for item in out.scheduled:
            if item.samples:
                for s in [item.seq, *out.forks.get(item.seq.seq_id, ())]:
                    res.sampled[s.seq_id] = (sum(s.token_ids) + s.index) % 50 + 10
        for o in self.sched.update(out, res):
            if o.finish_reason is not None:
                self.finished.add(o.request_id)

    @precondition(lambda self: self.live)
    @rule(which=st.integers(0, 1000))
    def abort(self, which: int) -> None:
        rid = self.live.pop(which % len(self.live))
        self.sched.abort(rid)

    @invariant()
    def blocks_are_neither_leaked_nor_double_freed(self) -> None:
        pool = self.kv.pool
        held = Counter(b.block_id for table in self.kv.tables.values() for b in table)
        for block in pool.blocks:
            assert block.ref_count == held.get(block.block_id, 0), (block, held.get(block.block_id))
            assert (block.block_id in pool.free_queue) == (block.ref_count == 0), block
        assert pool.num_free_blocks + pool.num_used_blocks == pool.num_blocks
        # Only live (unfinished) sequences hold blocks, and their id tables mirror the block tables.
        for seq_id, table in self.kv.tables.items():
            assert not self.kv.owners[seq_id].is_finished
            assert self.kv.id_tables[seq_id] == [b.block_id for b in table]

    @invariant()
    def prefix_cache_index_is_consistent(self) -> None:
        for block_hash, block in self.kv.pool.cached.items():
            assert block.block_hash == block_hash and block.hash_key is not None

    def teardown(self) -> None:
        if not hasattr(self, "sched"):
            return
        for rid in list(self.live):
            self.sched.abort(rid)
        for _ in range(200):
            if not self.sched.has_unfinished():
                break
            self.step()
        assert not self.sched.has_unfinished()
        assert self.kv.tables == {} and self.kv.pool.num_free_blocks == self.kv.pool.num_blocks


TestSchedulerInvariants = SchedulerMachine.TestCase
TestSchedulerInvariants.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])
