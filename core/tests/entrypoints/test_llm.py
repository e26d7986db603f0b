"""LLM: the offline API end to end on a tiny random Llama (generate, chat, n, stop strings, errors)."""

from __future__ import annotations

import os

import pytest
from pagedllm.entrypoints.llm import LLM
from pagedllm.errors import ContextLengthExceededError, InvalidRequestError
from pagedllm.model.testing import ReferencePlatform
from pagedllm.sample.sampling_params import SamplingParams

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PAGEDLLM_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    from pagedllm.model.testing import make_tiny_model

    path = make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama-llm"), seed=0)
    return LLM(path, dtype="float32", num_gpu_blocks_override=256, platform=ReferencePlatform())


def test_generate_returns_outputs_in_input_order(llm):
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = ["hello", "a much longer prompt than the first", [1, 2, 3]]
    outs = llm.generate(prompts, greedy, use_tqdm=False)
    assert [o.prompt for o in outs] == ["hello", "a much longer prompt than the first", None]
    assert outs[2].prompt_token_ids == [1, 2, 3]
    for o in outs:
        assert o.finished and len(o.outputs) == 1
        assert len(o.outputs[0].token_ids) == 8 and o.outputs[0].finish_reason == "length"
    alone = llm.generate("a much longer prompt than the first", greedy, use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert alone.outputs[0].text == llm.get_tokenizer().decode(alone.outputs[0].token_ids)


def test_single_prompt_and_token_id_prompt_and_per_prompt_params(llm):
    (one,) = llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert one.prompt_token_ids == [5, 6, 7]
    outs = llm.generate(
        ["x", "y"],
        [
            SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
        ],
        use_tqdm=False,
    )
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 5]


def test_n_samples_are_returned_together(llm):
    (out,) = llm.generate(
        "abc", SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True), use_tqdm=False
    )
    assert sorted(c.index for c in out.outputs) == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)


def test_stop_string_ends_the_request_and_frees_the_engine(llm):
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = llm.generate("stop test", greedy, use_tqdm=False)[0].outputs[0].text
    # Cut at a character produced in the middle of the completion.
    stop = full[len(full) // 2]
    out = llm.generate(
        "stop test",
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[: full.index(stop)]
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.engine_core.kv_cache_manager.pool.num_used_blocks == 0


def test_chat_applies_the_template(llm):
    msgs = [{"role": "user", "content": "hi"}]
    (out,) = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    expected = llm.get_tokenizer().apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert out.prompt == expected
    assert out.prompt_token_ids == llm.get_tokenizer().encode(expected, add_special_tokens=False)
    two = llm.chat([msgs, msgs], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in two] == [out.outputs[0].token_ids] * 2


def test_bad_prompt_raises_before_anything_is_queued(llm):
    with pytest.raises(InvalidRequestError):
        llm.generate(["fine", ""], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ContextLengthExceededError, match="256"):
        llm.generate("x" * 300, SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_prompt_logprobs_and_logprobs_come_back(llm):
    (out,) = llm.generate(
        [3, 4, 5, 6],
        SamplingParams(temperature=0, max_tokens=3, logprobs=2, prompt_logprobs=1, ignore_eos=True),
        use_tqdm=False,
    )
    assert (
        out.prompt_logprobs is not None and len(out.prompt_logprobs) == 4 and out.prompt_logprobs[0] is None
    )
    assert 4 in out.prompt_logprobs[1] and 6 in out.prompt_logprobs[3]
    lps = out.outputs[0].logprobs
    assert len(lps) == 3
    for tok, pos in zip(out.outputs[0].token_ids, lps, strict=True):
        assert tok in pos and len(pos) >= 2


def test_default_sampling_params_follow_generation_config(llm):
    sp = llm.get_default_sampling_params()
    assert sp.temperature == pytest.approx(0.7) and sp.top_p == pytest.approx(0.9)


def test_throughput_runs_compute_their_prompts_every_time(llm):
    """Repeated benchmark runs (and the warm-up) must not hit the prefix cache: HF recomputes too."""
    from pagedllm.bench.throughput import run_engine

    core = llm.llm_engine.engine_core
    prompts = [[7 + i] * 40 for i in range(3)]  # whole blocks that a second run could reuse
    for warmup in (True, False):
        hits = core.stats().prefix_cache_hits
        result = run_engine(llm, prompts, output_len=2, warmup=warmup)
        assert result.generated_tokens == 6
        assert core.stats().prefix_cache_hits == hits


def test_hf_comparison_on_a_gguf_without_accelerate_is_a_readable_error(monkeypatch, tmp_path):
    import importlib.util

    from pagedllm.bench import throughput
    from pagedllm.errors import ConfigError

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")  # never opened: the check comes first
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="pip install accelerate"):
        throughput.load_hf_model(str(gguf), "float32")
