"""EngineCore end to end on a tiny random Llama: outputs do not depend on batching, chunking, caching or preemption."""

from __future__ import annotations

import random

import pytest
import torch
from pagedllm.engine.engine_args import EngineArgs
from pagedllm.engine.engine_core import EngineCore
from pagedllm.engine.input_processor import InputProcessor
from pagedllm.model.testing import ReferencePlatform
from pagedllm.sample.sampling_params import SamplingParams


def make_core(model: str, **kw) -> tuple[EngineCore, InputProcessor]:
    kw.setdefault("dtype", "float32")
    kw.setdefault("num_gpu_blocks_override", 512)
    core = EngineCore(EngineArgs(model=model, **kw).create_engine_config(), ReferencePlatform())
    return core, InputProcessor(core.config, core.tokenizer_info, core.num_blocks)


def run(
    core: EngineCore,
    proc: InputProcessor,
    requests: list[tuple[str, list[int], SamplingParams]],
    max_steps=5000,
):
    """Add every request, step to completion; tokens and finish reasons per (request id, index)."""
    for rid, prompt, params in requests:
        core.add_request(proc.process(rid, prompt, params))
    tokens: dict[tuple[str, int], list[int]] = {}
    reasons: dict[tuple[str, int], str] = {}
    for _ in range(max_steps):
        if not core.has_unfinished_requests():
            break
        for o in core.step():
            tokens.setdefault((o.request_id, o.index), []).extend(o.new_token_ids)
            if o.finish_reason is not None:
                reasons[(o.request_id, o.index)] = o.finish_reason
    assert not core.has_unfinished_requests()
    return tokens, reasons


def mixed_requests(n: int = 32, seed: int = 0) -> list[tuple[str, list[int], SamplingParams]]:
    """Greedy and seeded-sampling requests, lengths 1..60, some sharing a 40-token prefix."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, 256) for _ in range(40)]
    reqs = []
    for i in range(n):
        length = rng.randrange(1, 61)
        prompt = [rng.randrange(3, 256) for _ in range(length)]
        if i % 3 == 0:
            prompt = shared + prompt[:10]
        if i % 2 == 0:
            params = SamplingParams(temperature=0.0, max_tokens=rng.randrange(4, 20), ignore_eos=True)
        else:
            params = SamplingParams(
                temperature=0.8, top_p=0.9, seed=1000 + i, max_tokens=rng.randrange(4, 20), ignore_eos=True
            )
        reqs.append((f"r{i}", prompt, params))
    return reqs


@pytest.fixture(scope="module")
def alone(tiny_llama):
    """Each request run by itself, prefix caching off: the reference every variant must match."""
    torch.set_num_threads(1)
    core, proc = make_core(tiny_llama, enable_prefix_caching=False)
    tokens = {}
    for req in mixed_requests():
        t, _ = run(core, proc, [req])
        tokens.update(t)
    return tokens


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(max_num_batched_tokens=8),  # every prompt chunks across steps
        dict(enable_prefix_caching=False),
        dict(max_num_seqs=5, block_size=4),
    ],
    ids=["batched", "chunked-prefill", "no-prefix-cache", "few-seqs-small-blocks"],
)
def test_outputs_do_not_depend_on_batch_composition(tiny_llama, alone, variant):
    core, proc = make_core(tiny_llama, **variant)
    tokens, _ = run(core, proc, mixed_requests())
    assert tokens == alone


def test_outputs_survive_preemption_by_recompute(tiny_llama, alone):
    # 24 blocks of 16 tokens cannot hold 32 requests of up to 80 tokens: preemption is forced.
    core, proc = make_core(tiny_llama, num_gpu_blocks_override=24, max_num_batched_tokens=64)
    tokens, _ = run(core, proc, mixed_requests())
    assert core.stats().num_preemptions > 0
    assert tokens == alone
    assert core.kv_cache_manager.pool.num_used_blocks == 0


def test_prefix_cache_hits_are_counted_and_change_nothing(tiny_llama, alone):
    core, proc = make_core(tiny_llama)
    reqs = mixed_requests()
    run(core, proc, reqs[:1])
    tokens, _ = run(core, proc, [(f"again-{rid}", p, sp) for rid, p, sp in reqs])
    stats = core.stats()
    assert stats.prefix_cache_hits > 0 and stats.prefix_cache_queries > stats.prefix_cache_hits
    assert {(rid.removeprefix("again-"), i): t for (rid, i), t in tokens.items()} == alone


def test_n_samples_fork_from_one_prompt_and_match_separate_seeded_requests(tiny_llama):
    prompt = list(range(10, 31))  # 21 tokens: the last block is partial, so forks copy on write
    core, proc = make_core(tiny_llama)
    tokens, _ = run(
        core,
        proc,
        [("n", prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True))],
    )
    assert sorted(tokens) == [("n", 0), ("n", 1), ("n", 2)]
    for i in range(3):
        single, _ = run(
            core,
            proc,
            [(f"s{i}", prompt, SamplingParams(temperature=1.0, seed=7 + i, max_tokens=12, ignore_eos=True))],
        )
        assert single[(f"s{i}", 0)] == tokens[("n", i)]
    assert len({tuple(t) for t in tokens.values()}) == 3
    assert core.kv_cache_manager.pool.num_used_blocks == 0


def test_greedy_n_samples_are_identical(tiny_llama):
    core, proc = make_core(tiny_llama)
    tokens, _ = run(core, proc, [("g", [5, 6, 7], SamplingParams(n=2, temperature=0.0, max_tokens=6))])
    assert tokens[("g", 0)] == tokens[("g", 1)]


def test_abort_mid_flight_frees_every_block(tiny_llama):
    core, proc = make_core(tiny_llama, max_num_batched_tokens=16)
    for rid, prompt, params in mixed_requests(8):
        core.add_request(proc.process(rid, prompt, params))
    for _ in range(5):
        core.step()
    core.abort_requests([f"r{i}" for i in range(8)])
    assert not core.has_unfinished_requests()
    assert core.kv_cache_manager.pool.num_used_blocks == 0


def test_kv_waste_stays_below_4_percent_at_steady_state(tiny_llama):
    rng = random.Random(1)
    core, proc = make_core(
        tiny_llama, num_gpu_blocks_override=64 * 32, max_num_seqs=64, max_num_batched_tokens=4096
    )
    for i in range(64):
        prompt = [rng.randrange(3, 256) for _ in range(rng.randrange(300, 400))]
        core.add_request(
            proc.process(f"w{i}", prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
        )
    wastes = []
    while core.has_unfinished_requests():
        core.step()
        stats = core.stats()
        if stats.num_running == 64 and stats.num_waiting == 0:
            wastes.append(stats.kv_waste_fraction)
    assert len(wastes) > 10
    assert max(wastes) < 0.04, max(wastes)


def test_stats_count_tokens_and_steps(tiny_llama):
    core, proc = make_core(tiny_llama)
    run(core, proc, [("a", [1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))])
    s = core.stats()
    assert s.prompt_tokens == 5 and s.generation_tokens == 4 and s.num_steps == 4
    assert 0 < s.model_time_s <= s.step_time_s


def test_prompt_logprobs_are_the_same_when_the_prompt_is_chunked(tiny_llama):
    prompt = list(range(20, 57))
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3, ignore_eos=True)

    def prompt_logprobs(**kw):
        core, proc = make_core(tiny_llama, **kw)
        core.add_request(proc.process("p", prompt, params))
        got = None
        while core.has_unfinished_requests():
            for o in core.step():
                if o.prompt_logprobs is not None:
                    assert got is None, "prompt logprobs are sent once"
                    got = o.prompt_logprobs
        return got

    whole = prompt_logprobs()
    chunked = prompt_logprobs(max_num_batched_tokens=5)
    assert len(whole) == len(prompt) and whole[0] is None
    for i in range(1, len(prompt)):
        assert prompt[i] in whole[i]
        assert whole[i].keys() == chunked[i].keys()
        for tok in whole[i]:
            assert whole[i][tok].logprob == pytest.approx(chunked[i][tok].logprob, abs=1e-4)
