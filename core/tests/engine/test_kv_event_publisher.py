"""KV events from a real engine core: subscribers' views equal the engine's prefix-cache index, also after lost events."""

from __future__ import annotations

import random
import time

import pytest
from pagedllm.engine.engine_args import EngineArgs
from pagedllm.engine.engine_core import EngineCore
from pagedllm.engine.input_processor import InputProcessor
from pagedllm.model.testing import ReferencePlatform
from pagedllm.router.kv_index import KVEventSubscriber, prompt_block_hashes
from pagedllm.sample.sampling_params import SamplingParams


def _engine_view(core: EngineCore) -> dict[bytes, bytes | None]:
    return {h: b.hash_key.parent for h, b in core.kv_cache_manager.pool.cached.items()}


def _wait(cond, core: EngineCore, timeout_s: float = 20.0) -> None:
    """Let the engine answer snapshot requests (its loop would) until ``cond()`` holds."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        core.kv_events.answer_snapshots()
        time.sleep(0.01)


@pytest.fixture
def core_with_events(tiny_llama, tmp_path):
    config = EngineArgs(
        model=tiny_llama, dtype="float32", num_gpu_blocks_override=24, block_size=4,
        kv_events_config={"enable_kv_cache_events": True, "endpoint": f"ipc://{tmp_path}/ev",
                          "snapshot_endpoint": f"ipc://{tmp_path}/snap"},
    ).create_engine_config()
    core = EngineCore(config, ReferencePlatform())
    sub = KVEventSubscriber(core.kv_events.endpoint, core.kv_events.snapshot_endpoint).start()
    _wait(lambda: sub.synced, core)
    yield core, InputProcessor(core.config, core.tokenizer_info, core.num_blocks), sub
    sub.stop()
    core.kv_events.close()


def _run(core: EngineCore, proc: InputProcessor, prompts: list[list[int]], tag: str) -> None:
    for i, p in enumerate(prompts):
        core.add_request(proc.process(f"{tag}-{i}", p, SamplingParams(max_tokens=3, temperature=0.0)))
    while core.has_unfinished_requests():
        core.step()


def _prompts(rng: random.Random, shared: list[int], n: int) -> list[list[int]]:
    return [shared + [rng.randrange(3, 250) for _ in range(rng.randrange(1, 14))] for _ in range(n)]


def test_subscriber_view_equals_engine_cache_through_stores_and_evictions(core_with_events):
    core, proc, sub = core_with_events
    rng = random.Random(0)
    for round_ in range(4):  # 24 blocks of 4 tokens: later rounds evict earlier prefixes
        _run(core, proc, _prompts(rng, [rng.randrange(3, 250) for _ in range(20)], 3), f"r{round_}")
        _wait(lambda: sub.seq == core.kv_events.seq, core)
        assert sub.blocks() == _engine_view(core)
    assert core.kv_cache_manager.pool.num_evictions > 0
    assert sub.num_resyncs == 1 and sub.num_gaps == 0


def test_dropped_sequence_number_triggers_resync_to_the_exact_engine_cache(core_with_events, monkeypatch):
    core, proc, sub = core_with_events
    rng = random.Random(1)
    _run(core, proc, _prompts(rng, [rng.randrange(3, 250) for _ in range(16)], 2), "a")
    _wait(lambda: sub.seq == core.kv_events.seq, core)
    # Lose batches on purpose: their sequence numbers are used up but nothing reaches the subscriber.
    publisher = core.kv_events
    lost: list[int] = []
    monkeypatch.setattr(publisher, "_send", lambda seq, body: lost.append(seq))
    _run(core, proc, _prompts(rng, [rng.randrange(3, 250) for _ in range(16)], 2), "b")
    monkeypatch.undo()
    assert lost and sub.seq < lost[0]
    assert sub.blocks() != _engine_view(core)  # the view is stale now
    _run(core, proc, _prompts(rng, [rng.randrange(3, 250) for _ in range(8)], 1), "c")
    _wait(lambda: sub.seq == core.kv_events.seq, core)
    assert sub.num_gaps == 1 and sub.num_resyncs == 2
    assert sub.blocks() == _engine_view(core)


def test_reset_prefix_cache_clears_the_view(core_with_events):
    core, proc, sub = core_with_events
    _run(core, proc, [list(range(3, 30))], "x")
    _wait(lambda: sub.seq == core.kv_events.seq, core)
    assert sub.blocks()
    assert core.reset_prefix_cache()
    _wait(lambda: sub.seq == core.kv_events.seq, core)
    assert sub.blocks() == {} == _engine_view(core)


def test_router_prompt_hashes_match_the_engine_lookup(core_with_events):
    core, proc, sub = core_with_events
    prompt = list(range(3, 40))  # 37 tokens: 9 full blocks of 4, the engine may reuse 9
    _run(core, proc, [prompt], "p")
    _wait(lambda: sub.seq == core.kv_events.seq, core)
    hashes = prompt_block_hashes(prompt + [7, 8, 9], 4)
    assert sub.matched_blocks(hashes) == 9
    assert sub.matched_blocks(prompt_block_hashes(prompt, 4, cache_salt="tenant")) == 0
