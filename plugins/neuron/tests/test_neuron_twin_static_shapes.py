"""Static shapes on the Neuron platform's XLA:CPU twin: warm-up covers every step of a mixed run."""

from __future__ import annotations

import importlib.util
import random

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="needs torch-xla (tox -e xla)")


def mixed_requests(n: int, seed: int = 0) -> tuple[list[list[int]], list]:
    """Varied prompt and output lengths; greedy, temperature, and fallback rows (top-p + seed, logprobs)."""
    from pagedllm.sample.sampling_params import SamplingParams

    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(n):
        prompts.append([rng.randrange(3, 250) for _ in range(rng.randint(2, 150))])
        common = dict(max_tokens=rng.randint(1, 40), ignore_eos=True)
        kind = i % 4
        if kind == 0:
            params.append(SamplingParams(temperature=0, **common))
        elif kind == 1:
            params.append(SamplingParams(temperature=0.8, **common))
        elif kind == 2:
            params.append(SamplingParams(temperature=0.7, top_p=0.9, seed=i, **common))
        else:
            params.append(SamplingParams(temperature=0, logprobs=2, **common))
    return prompts, params


def test_mixed_run_with_chunked_prefill_and_preemption_compiles_nothing_after_warm_up(
    xla_twin: None, tmp_path
) -> None:
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.kernels.xla.compile_watch import compile_count
    from pagedllm.model.testing import make_tiny_model

    path = make_tiny_model("llama", tmp_path / "tiny")
    # 64 tokens a step chunks every longer prompt; 40 blocks of 16 cannot hold 16 running sequences.
    llm = LLM(path, platform="neuron", dtype="float32", max_num_seqs=16, max_model_len=256,
              max_num_batched_tokens=64, num_gpu_blocks_override=40)
    platform = llm.llm_engine.engine_core.executor.runner.platform
    ready = compile_count()
    prompts, params = mixed_requests(64)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    new = compile_count() - ready
    preemptions = llm.llm_engine.engine_core.scheduler.num_preemptions
    print(f"neuron twin: warm-up compiled {platform.watch.warmup_graphs} graphs ({platform.describe()['buckets']}); "
          f"64 mixed requests, {preemptions} preemptions: {new} graphs compiled after warm-up")
    assert [len(o.outputs[0].token_ids) for o in outputs] == [p.max_tokens for p in params]
    assert all(o.outputs[0].logprobs for o, p in zip(outputs, params, strict=True) if p.logprobs)
    assert preemptions > 0 and max(len(p) for p in prompts) > 64
    assert new == 0 and platform.watch.since_ready == 0
