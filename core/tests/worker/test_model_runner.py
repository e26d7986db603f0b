"""ModelRunner: KV cache sizing, logits only for sampling rows, and the captured-decode path."""

from __future__ import annotations

import dataclasses
import os

import pytest
from pagedllm.attention.reference import ReferenceAttentionBackend
from pagedllm.engine.engine_args import EngineArgs
from pagedllm.engine.engine_core import EngineCore
from pagedllm.engine.input_processor import InputProcessor
from pagedllm.errors import ConfigError
from pagedllm.model.testing import ReferencePlatform, make_tiny_model
from pagedllm.sample.sampling_params import SamplingParams

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PAGEDLLM_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-runner"), seed=1)


def make_core(model: str, platform=None, **kw) -> EngineCore:
    kw.setdefault("dtype", "float32")
    return EngineCore(EngineArgs(model=model, **kw).create_engine_config(), platform or ReferencePlatform())


def greedy(core: EngineCore, prompts: list[list[int]], max_tokens: int = 6) -> list[list[int]]:
    proc = InputProcessor(core.config, core.tokenizer_info, core.num_blocks)
    for i, p in enumerate(prompts):
        core.add_request(
            proc.process(f"r{i}", p, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        )
    out: dict[str, list[int]] = {}
    while core.has_unfinished_requests():
        for o in core.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [out[f"r{i}"] for i in range(len(prompts))]


def test_kv_blocks_follow_the_memory_budget(tiny):
    core = make_core(tiny, kv_cache_memory=1 << 20)
    per_block = core.executor.runner.bytes_per_block()
    # tiny llama: 2 layers x (K and V) x 16 tokens x 2 kv heads x 16 dims x 4 bytes
    assert per_block == 2 * 2 * 16 * 2 * 16 * 4
    assert core.num_blocks == (1 << 20) // per_block
    assert core.executor.runner.kv_caches[0].shape[1] == core.num_blocks


def test_block_override_wins_and_tiny_budget_is_a_config_error(tiny):
    assert make_core(tiny, kv_cache_memory=1 << 20, num_gpu_blocks_override=7).num_blocks == 7
    with pytest.raises(ConfigError, match="kv-cache-memory"):
        make_core(tiny, kv_cache_memory=100)


def test_logits_are_computed_only_for_rows_that_sample(tiny):
    core = make_core(tiny, num_gpu_blocks_override=64, max_num_batched_tokens=8)
    model = core.executor.runner.model
    rows = []
    original = model.compute_logits

    def spy(hidden):
        rows.append(hidden.shape[0])
        return original(hidden)

    model.compute_logits = spy
    greedy(core, [list(range(3, 23))], max_tokens=2)  # 20-token prompt in chunks of 8: 8, 8, 4 + 1 decode
    assert rows == [1, 1]


class DeviceTensorReference(ReferenceAttentionBackend):
    """The reference backend reading only device tensors, as a graph replay requires."""

    def forward(self, query, key, value, kv_cache, metadata):
        md = dataclasses.replace(
            metadata,
            query_start_loc_cpu=metadata.query_start_loc.tolist(),
            seq_lens_cpu=metadata.seq_lens.tolist(),
        )
        return super().forward(query, key, value, kv_cache, md)


class EagerDecodeGraphs:
    """Stands in for captured graphs: a replay reruns the captured step over the persistent buffers."""

    def __init__(self, step, sizes):
        self.step, self.batch_sizes, self.replays = step, sorted(sizes), 0

    def padded_size(self, n):
        return next((s for s in self.batch_sizes if s >= n), None)

    def replay(self, n):
        self.replays += 1
        return self.step(self.padded_size(n))[:n]


class CapturingPlatform(ReferencePlatform):
    def attention_backend(self, spec):
        return DeviceTensorReference(spec)

    def compile_or_capture(self, model_runner):
        model_runner.decode_step_for_capture(8)  # a capture runs the step once, allocating the buffers
        self.graphs = EagerDecodeGraphs(model_runner.decode_step_for_capture, [1, 2, 4, 8])
        model_runner.decode_graphs = self.graphs


def test_captured_decode_steps_give_the_same_tokens(tiny):
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 9, 30, 1, 12)]  # 6 sequences: replays pad to 8
    eager = greedy(make_core(tiny, num_gpu_blocks_override=64), prompts)
    platform = CapturingPlatform()
    captured = greedy(make_core(tiny, platform, num_gpu_blocks_override=64), prompts)
    assert captured == eager
    assert platform.graphs.replays >= 5


def test_batches_larger_than_any_graph_run_eagerly(tiny):
    prompts = [list(range(7, 7 + n)) for n in range(1, 11)]  # 10 sequences > largest graph (8)
    eager = greedy(make_core(tiny, num_gpu_blocks_override=64), prompts, max_tokens=3)
    platform = CapturingPlatform()
    captured = greedy(make_core(tiny, platform, num_gpu_blocks_override=64), prompts, max_tokens=3)
    assert captured == eager and platform.graphs.replays == 0
