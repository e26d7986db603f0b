"""Captured CPU decode steps: replays equal eager steps, refusals are safe, and the engine uses them."""

from __future__ import annotations

import pytest
import torch
from pagedllm.entrypoints.llm import LLM
from pagedllm.model.testing import make_tiny_model, write_tiny_gguf
from pagedllm.sample.sampling_params import SamplingParams
from pagedllm_cpu import capture
from pagedllm_cpu.kernels import clib

needs_kernels = pytest.mark.skipif(
    clib.status()[0] is None, reason=f"C kernels unavailable: {clib.status()[1]}"
)

PROMPTS = [[104, 101, 108, 108, 111], [1, 2, 3], list(range(40, 71)), [200] * 9, [7], [99, 98, 97, 96]]


def _greedy(llm: LLM, prompts: list[list[int]], n: int = 12) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def _runner(llm: LLM):
    return llm.llm_engine.engine_core.executor.runner


@needs_kernels
@pytest.mark.parametrize(
    ("arch", "quantize"),
    [
        ("llama", "Q4_1"),
        ("qwen2", "Q8_0"),
        ("qwen2", "mixed"),
        ("qwen3", None),
        ("gemma2", None),
        ("llama", None),
    ],
)
def test_captured_decodes_give_the_eager_ids(arch: str, quantize: str | None, tmp_path) -> None:
    # GGUF blocks (packed kernels) and dense safetensors (mm replayed through mm.out); q/k norms,
    # soft-capping and sliding windows; batches of 1, 3 (padded to 4) and 6 (padded to 8). "mixed":
    # a Q8_0 v beside Q4_1 q/k, so each qkv_proj is multiplied part by part (torch.cat replayed).
    if quantize == "mixed":
        quantize = lambda name: "Q8_0" if ".v_proj." in name else "Q4_1"  # noqa: E731
    hf_dir = make_tiny_model(arch, tmp_path / arch)
    model = write_tiny_gguf(hf_dir, tmp_path / f"{arch}.gguf", quantize=quantize) if quantize else hf_dir
    # Each size is captured on its first step, between steps of the live sequences (whose KV
    # blocks the capture borrows and puts back).
    captured = LLM(model, dtype="float32", max_num_seqs=8, max_model_len=128)
    graphs = _runner(captured).decode_graphs
    assert graphs is not None and graphs.captured == {}, graphs.describe()
    eager = LLM(model, dtype="float32", max_num_seqs=8, max_model_len=128, enforce_eager=True)
    assert _runner(eager).decode_graphs is None
    for batch in (PROMPTS[:1], PROMPTS[:3], PROMPTS):
        assert _greedy(captured, batch) == _greedy(eager, batch)
    assert sorted(graphs.captured) == [1, 4, 8], graphs.describe()


@needs_kernels
def test_a_one_shot_generate_captures_only_the_decode_sizes_it_uses(tmp_path) -> None:
    # `pagedllm generate` of one prompt used to capture all eleven sizes at startup (~23 s).
    llm = LLM(make_tiny_model("llama", tmp_path / "llama"), dtype="float32", max_num_seqs=64, max_model_len=64)
    graphs = _runner(llm).decode_graphs
    assert graphs.captured == {} and graphs.refused == {}
    _greedy(llm, PROMPTS[:1], n=4)
    assert sorted(graphs.captured) == [1] and graphs.refused == {}
    assert "captured for batch sizes [1]" in _runner(llm).platform.describe()["decode capture"]


@needs_kernels
def test_a_lazy_capture_puts_back_the_kv_blocks_it_borrows(tmp_path) -> None:
    llm = LLM(make_tiny_model("llama", tmp_path / "llama"), dtype="float32", max_num_seqs=8, max_model_len=64)
    runner = _runner(llm)
    for kv_cache in runner.kv_caches:  # stands in for live sequences' keys and values
        kv_cache.normal_()
    before = [kv_cache.clone() for kv_cache in runner.kv_caches]
    assert runner.decode_graphs.capture_size(8)
    assert all(torch.equal(a, b) for a, b in zip(before, runner.kv_caches, strict=True))


@needs_kernels
def test_startup_mode_captures_every_size_before_serving(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(capture.MODE_ENV, "startup")
    llm = LLM(make_tiny_model("llama", tmp_path / "llama"), dtype="float32", max_num_seqs=8, max_model_len=64)
    assert sorted(_runner(llm).decode_graphs.captured) == [1, 2, 4, 8]
    monkeypatch.setenv(capture.MODE_ENV, "eventually")
    with pytest.raises(ValueError, match=f"{capture.MODE_ENV}='eventually'"):
        capture.capture_mode()


@needs_kernels
def test_the_engine_replays_small_decode_steps_and_runs_larger_ones_eagerly(tmp_path, monkeypatch) -> None:
    # max_num_seqs 12: sizes 1, 2, 4 and 8 may be captured (16 would exceed it), so 12 run eagerly.
    llm = LLM(
        make_tiny_model("llama", tmp_path / "llama"), dtype="float32", max_num_seqs=12, max_model_len=128
    )
    graphs = _runner(llm).decode_graphs
    replayed: list[int] = []
    original = graphs.replay
    monkeypatch.setattr(graphs, "replay", lambda n: replayed.append(n) or original(n))
    _greedy(llm, PROMPTS[:2], n=4)
    assert replayed and set(replayed) == {2}  # every decode step of the pair; the prefill ran eagerly
    replayed.clear()
    _greedy(llm, [[i + 1, i + 2] for i in range(12)], n=3)
    assert replayed == []  # 12 sequences: above the largest captured size


class _FakeRunner:
    """decode_inputs_for_capture / decode_forward_for_capture over a function of our choosing."""

    def __init__(self, llm: LLM, forward) -> None:
        self.real = _runner(llm)
        self.forward = forward
        self.config = self.real.config

    def decode_inputs_for_capture(self, n: int):
        return self.real.decode_inputs_for_capture(n)

    def decode_forward_for_capture(self, ids, positions, metadata):
        return self.forward(self.real.decode_forward_for_capture(ids, positions, metadata))

    def __getattr__(self, name: str):  # buffers, KV caches, sizes: the real runner's
        return getattr(self.real, name)


@needs_kernels
def test_a_step_with_an_op_a_replay_cannot_repeat_is_refused_and_runs_eagerly(tmp_path) -> None:
    llm = LLM(make_tiny_model("llama", tmp_path / "llama"), dtype="float32", max_num_seqs=4, max_model_len=64)
    # nonzero has a data-dependent output shape: no replay can write it into a fixed buffer.
    runner = _FakeRunner(llm, lambda hidden: hidden + torch.nonzero(hidden > 0).shape[0] * 0)
    with pytest.raises(capture.NotCapturable, match="nonzero"):
        capture.capture_step(runner, 1)
    graphs = capture.CpuDecodeGraphs(runner)
    graphs.capture()
    assert graphs.captured == {} and graphs.padded_size(1) is None
    assert "nonzero" in graphs.describe()


@needs_kernels
def test_a_replay_that_differs_from_the_eager_step_is_not_kept(tmp_path, monkeypatch) -> None:
    llm = LLM(make_tiny_model("llama", tmp_path / "llama"), dtype="float32", max_num_seqs=2, max_model_len=64)
    monkeypatch.setattr(capture.CapturedStep, "replay", lambda self: self.output + 1)
    graphs = capture.CpuDecodeGraphs(_runner(llm))
    graphs.capture()
    assert graphs.captured == {} and "differs" in graphs.describe()


@needs_kernels
def test_enforce_eager_and_missing_kernels_mean_no_capture(tmp_path, monkeypatch) -> None:
    model = make_tiny_model("llama", tmp_path / "llama")
    assert _runner(LLM(model, dtype="float32", max_num_seqs=2, enforce_eager=True)).decode_graphs is None
    monkeypatch.setenv(clib.KERNELS_ENV, "0")
    clib.reset()
    try:
        llm = LLM(model, dtype="float32", max_num_seqs=2)
        assert _runner(llm).decode_graphs is None
        assert _greedy(llm, PROMPTS[:2], n=4)  # and it still generates
    finally:
        monkeypatch.delenv(clib.KERNELS_ENV)
        clib.reset()


@needs_kernels
def test_validation_catches_a_computation_baked_in_at_capture(tmp_path, monkeypatch) -> None:
    # Planted bug: treat every reshape as a view. Qwen3's per-head q/k norms reshape strided rows,
    # which copies from 2 tokens on; a replay would reuse the capture-time copy. The validation
    # runs replay and eager on fresh inputs where attention depends on the query, so it sees it.
    monkeypatch.setattr(capture, "_aliases", lambda out, args: True)
    monkeypatch.setenv(capture.MODE_ENV, "startup")
    llm = LLM(make_tiny_model("qwen3", tmp_path / "qwen3"), dtype="float32", max_num_seqs=8, max_model_len=64)
    graphs = _runner(llm).decode_graphs
    assert sorted(graphs.captured) == [1]  # one token: the reshape really is a view
    assert set(graphs.refused) == {2, 4, 8} and all("differs" in why for why in graphs.refused.values())


@needs_kernels
def test_a_spent_time_budget_leaves_larger_sizes_eager(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(capture.BUDGET_ENV, "0")
    monkeypatch.setenv(capture.MODE_ENV, "startup")
    llm = LLM(make_tiny_model("llama", tmp_path / "llama"), dtype="float32", max_num_seqs=8, max_model_len=64)
    graphs = _runner(llm).decode_graphs
    assert sorted(graphs.captured) == [1]  # the first size is always tried
    assert all("budget" in why for why in graphs.refused.values()) and set(graphs.refused) == {2, 4, 8}
    assert _greedy(llm, PROMPTS[:3], n=4)  # 3 sequences: no captured size fits, eager
    monkeypatch.setenv(capture.BUDGET_ENV, "soon")
    with pytest.raises(ValueError, match=f"{capture.BUDGET_ENV}='soon'"):
        capture.capture_budget()
