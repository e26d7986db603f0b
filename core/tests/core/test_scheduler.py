"""Scheduler: token budget, max_num_seqs, chunked prefill, preemption, rejection, abort, n > 1 forks."""

from __future__ import annotations

from pagedllm.config import SchedulerConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Sequence, SequenceStatus
from pagedllm.core.scheduler import Scheduler, SchedulerOutput, StepResult
from pagedllm.sample.sampling_params import SamplingParams


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=64, max_model_len=256, caching=True):
    kv = KVCacheManager(num_blocks, block_size, caching)
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget), kv, max_model_len
    )


def add(
    sched: Scheduler, rid: str, prompt: list[int], t: float = 0.0, priority: int = 0, n: int = 1, **params
):
    params.setdefault("max_tokens", 8)
    sp = SamplingParams(n=n, **params)
    seqs = [
        Sequence(
            request_id=rid,
            index=i,
            token_ids=list(prompt),
            num_prompt_tokens=len(prompt),
            params=sp,
            arrival_time=t,
            priority=priority,
        )
        for i in range(n)
    ]
    sched.add_sequences(seqs)
    return seqs


def fake_next(s: Sequence) -> int:
    """A deterministic stand-in for greedy decoding: depends only on the sequence's history."""
    return (sum(t * (i + 1) for i, t in enumerate(s.token_ids)) + 7 * s.index) % 97 + 3


def step(sched: Scheduler) -> tuple[SchedulerOutput, list]:
    out = sched.schedule()
    res = StepResult()
    for item in out.scheduled:
        if item.samples:
            for s in [item.seq, *out.forks.get(item.seq.seq_id, ())]:
                res.sampled[s.seq_id] = fake_next(s)
    return out, sched.update(out, res)


def run_all(sched: Scheduler, max_steps: int = 1000) -> dict[tuple[str, int], list[int]]:
    tokens: dict[tuple[str, int], list[int]] = {}
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        _, outs = step(sched)
        for o in outs:
            tokens.setdefault((o.request_id, o.index), []).extend(o.new_token_ids)
    assert not sched.has_unfinished()
    return tokens


def test_budget_is_split_and_the_prompt_that_does_not_fit_is_chunked():
    sched = make_scheduler(budget=16)
    add(sched, "a", list(range(10)))
    add(sched, "b", list(range(100, 110)))
    add(sched, "c", list(range(200, 210)))
    out, _ = step(sched)
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 10), ("b", 6)]
    assert out.num_scheduled_tokens == 16
    assert [i.samples for i in out.scheduled] == [True, False]
    out, _ = step(sched)
    # Running first: a's decode and b's rest, then c gets what is left.
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 4), ("c", 10)]


def test_long_prompt_chunks_across_steps_and_samples_only_at_the_end():
    sched = make_scheduler(budget=16)
    add(sched, "a", list(range(40)))
    chunks = []
    for _ in range(3):
        out, outs = step(sched)
        chunks.append(out.scheduled[0].num_new_tokens)
        assert bool(outs) == (len(chunks) == 3)
    assert chunks == [16, 16, 8]


def test_max_num_seqs_caps_running_sequences():
    sched = make_scheduler(max_num_seqs=2)
    for r in "abc":
        add(sched, r, [1, 2, 3])
    out, _ = step(sched)
    assert len(out.scheduled) == 2 and len(sched.waiting) == 1


def test_n_counts_every_sample_against_max_num_seqs():
    sched = make_scheduler(max_num_seqs=4)
    add(sched, "a", [1, 2, 3], n=3)
    add(sched, "b", [4, 5, 6], n=2)
    out, _ = step(sched)
    assert [i.seq.request_id for i in out.scheduled] == ["a"]
    assert len(sched.running) == 3


def test_lower_priority_value_is_admitted_first():
    sched = make_scheduler(max_num_seqs=1)
    add(sched, "late", [1, 2], t=0.0, priority=5)
    add(sched, "urgent", [3, 4], t=1.0, priority=0)
    out, _ = step(sched)
    assert out.scheduled[0].seq.request_id == "urgent"


def test_preemption_picks_the_latest_arrival_and_counts_it():
    # 6 blocks of 4: three 8-token prompts take 2 blocks each; growing needs more.
    sched = make_scheduler(num_blocks=6, block_size=4)
    for k, r in enumerate("abc"):
        add(sched, r, list(range(10 * k, 10 * k + 8)), t=float(k), max_tokens=6)
    step(sched)
    assert sched.kv.pool.num_free_blocks == 0
    out, _ = step(sched)  # a and b need a third block: c (latest) is preempted
    assert out.num_preempted == 1 and sched.num_preemptions == 1
    assert [i.seq.request_id for i in out.scheduled] == ["a", "b"]
    assert sched.waiting[0].request_id == "c" and sched.waiting[0].num_computed_tokens == 0


def test_preemption_picks_the_worst_priority_first():
    sched = make_scheduler(num_blocks=6, block_size=4)
    add(sched, "a", list(range(8)), t=0.0, priority=9, max_tokens=6)
    add(sched, "b", list(range(10, 18)), t=1.0, priority=0, max_tokens=6)
    add(sched, "c", list(range(20, 28)), t=2.0, priority=1, max_tokens=6)
    step(sched)
    out, _ = step(sched)
    assert sched.waiting[0].request_id == "a"
    assert [i.seq.request_id for i in out.scheduled] == ["b", "c"]


def test_preempted_request_resumes_with_identical_tokens():
    prompts = {r: list(range(13 * k, 13 * k + 9)) for k, r in enumerate("abcdef")}

    def run(num_blocks):
        sched = make_scheduler(num_blocks=num_blocks, block_size=4, budget=12)
        for k, (r, p) in enumerate(prompts.items()):
            add(sched, r, p, t=float(k), max_tokens=12)
        return run_all(sched), sched.num_preemptions

    roomy, p0 = run(200)
    tight, p1 = run(8)
    assert p0 == 0 and p1 > 0
    assert tight == roomy
    assert all(len(v) == 12 for v in tight.values())


def test_request_that_can_never_fit_is_finished_with_error_not_left_waiting():
    sched = make_scheduler(num_blocks=2, block_size=4)
    add(sched, "huge", list(range(20)))
    add(sched, "ok", [1, 2, 3], max_tokens=2)
    tokens = run_all(sched, max_steps=20)
    assert tokens[("huge", 0)] == []
    assert len(tokens[("ok", 0)]) == 2


def test_error_output_names_the_reason():
    sched = make_scheduler(num_blocks=2, block_size=4)
    add(sched, "huge", list(range(20)))
    _, outs = step(sched)
    _, outs2 = step(sched) if not outs else (None, outs)
    (o,) = outs2
    assert o.finish_reason == "error" and "KV cache" in o.error


def test_abort_at_any_moment_frees_everything():
    for abort_after in range(0, 8):
        sched = make_scheduler(num_blocks=16, block_size=4, budget=6)
        add(sched, "a", list(range(14)), n=3, max_tokens=4)
        add(sched, "b", list(range(30, 40)), max_tokens=4)
        for _ in range(abort_after):
            step(sched)
        sched.abort("a")
        sched.abort("b")
        assert not sched.has_unfinished()
        assert sched.kv.pool.num_free_blocks == 16, abort_after
        assert all(b.ref_count == 0 for b in sched.kv.pool.blocks)
        assert sched.requests == {}


def test_n_samples_share_prompt_blocks_then_diverge():
    sched = make_scheduler(num_blocks=32, block_size=4)
    seqs = add(sched, "a", list(range(10)), n=3, max_tokens=5)
    _, outs = step(sched)
    assert sorted(o.index for o in outs) == [0, 1, 2]
    tables = [sched.kv.block_ids(s) for s in seqs]
    assert tables[0] == tables[1] == tables[2]
    out, _ = step(sched)
    assert len(out.copy_pairs) == 2  # two of three copy the shared partial block, the last writes in place
    tables = [sched.kv.block_ids(s) for s in seqs]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]
    assert len({t[2] for t in tables}) == 3
    tokens = run_all(sched)
    assert all(s.status is SequenceStatus.FINISHED for s in seqs)
    assert sched.kv.pool.num_used_blocks == 0
    assert len(tokens) == 3


def test_stop_on_eos_respects_min_tokens_and_ignore_eos():
    sched = make_scheduler()
    # fake_next is deterministic: find what the first token will be, make it the EOS.
    probe = Sequence(
        request_id="x",
        index=0,
        token_ids=[1, 2, 3],
        num_prompt_tokens=3,
        params=SamplingParams(),
        arrival_time=0,
    )
    eos = fake_next(probe)
    (s,) = add(sched, "a", [1, 2, 3], max_tokens=4)
    s.params.eos_token_ids = [eos]
    (t,) = add(sched, "b", [1, 2, 3], max_tokens=4, ignore_eos=True)
    t.params.eos_token_ids = [eos]
    (u,) = add(sched, "c", [1, 2, 3], max_tokens=4, stop_token_ids=[eos])
    tokens = run_all(sched)
    assert tokens[("a", 0)] == [eos] and s.finish_reason == "stop" and s.stop_reason is None
    assert len(tokens[("b", 0)]) == 4 and t.finish_reason == "length"
    assert u.finish_reason == "stop" and u.stop_reason == eos


def test_max_model_len_finishes_with_length():
    sched = make_scheduler(max_model_len=6)
    (s,) = add(sched, "a", [1, 2, 3, 4], max_tokens=None)
    tokens = run_all(sched)
    assert len(tokens[("a", 0)]) == 2 and s.finish_reason == "length"


def test_n_larger_than_max_num_seqs_is_failed_not_left_blocking():
    sched = make_scheduler(max_num_seqs=2)
    add(sched, "wide", [1, 2, 3], n=3)
    add(sched, "ok", [4, 5], max_tokens=2)
    tokens = run_all(sched, max_steps=20)
    assert tokens[("wide", 0)] == [] and len(tokens[("ok", 0)]) == 2


def test_prompt_logprobs_travel_with_sample_zero_only():
    sched = make_scheduler()
    parent, child = add(sched, "a", [1, 2, 3], n=2, prompt_logprobs=1)
    out = sched.schedule()
    res = StepResult(prompt_logprobs={parent.seq_id: [{}, {}]})
    for s in [parent, *out.forks[parent.seq_id]]:
        res.sampled[s.seq_id] = fake_next(s)
    outs = {o.index: o for o in sched.update(out, res)}
    assert outs[0].prompt_logprobs == [None, {}, {}] and outs[1].prompt_logprobs is None
    assert not child.wants_prompt_logprobs and not parent.wants_prompt_logprobs
