"""Engine invariants group: batching, chunked prefill, prefix caching and forced preemption do not change greedy outputs."""

from __future__ import annotations

import random
from typing import Any

import pytest

from pagedllm_conformance.manifest import dtype_name
from pagedllm_conformance.pytest_plugin import session_state

Request = tuple[str, list[int], int]  # request id, prompt token ids, max tokens


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "invariant_arch" in metafunc.fixturenames:
        # Gemma-2 adds sliding windows and soft-caps to the paths the scheduler exercises.
        archs = ["llama"] if session_state(metafunc.config).quick else ["llama", "gemma2"]
        metafunc.parametrize("invariant_arch", archs, scope="module")


def _requests(seed: int = 0) -> list[Request]:
    """Ten greedy requests, 1 to 45 prompt tokens, four sharing a 34-token prefix (two full blocks and a bit)."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, 256) for _ in range(34)]
    reqs = []
    for i in range(10):
        prompt = [rng.randrange(3, 256) for _ in range(rng.randrange(1, 46))]
        if i % 3 == 0:
            prompt = shared + prompt[:6]
        reqs.append((f"r{i}", prompt, rng.randrange(4, 13)))
    return reqs


def _core(path: str, platform: Any, dtype: Any, **kw: Any) -> tuple[Any, Any]:
    from pagedllm.engine.engine_args import EngineArgs
    from pagedllm.engine.engine_core import EngineCore
    from pagedllm.engine.input_processor import InputProcessor

    kw.setdefault("num_gpu_blocks_override", 256)
    args = EngineArgs(model=path, dtype=dtype_name(dtype), seed=0, **kw)
    core = EngineCore(args.create_engine_config(), platform)
    return core, InputProcessor(core.config, core.tokenizer_info, core.num_blocks)


def _run(core: Any, proc: Any, requests: list[Request], max_steps: int = 5000) -> dict[str, list[int]]:
    """Add every request at once and step to completion; generated token ids per request id."""
    from pagedllm.sample.sampling_params import SamplingParams

    for rid, prompt, max_tokens in requests:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        core.add_request(proc.process(rid, prompt, params))
    tokens: dict[str, list[int]] = {rid: [] for rid, _, _ in requests}
    for _ in range(max_steps):
        if not core.has_unfinished_requests():
            break
        for out in core.step():
            if out.error:
                raise AssertionError(f"request {out.request_id} failed in the engine: {out.error}")
            tokens[out.request_id].extend(out.new_token_ids)
    if core.has_unfinished_requests():
        raise AssertionError(f"requests still unfinished after {max_steps} steps")
    return tokens


@pytest.fixture(scope="module")
def alone(invariant_arch, tiny_model, conformance_target) -> dict[str, list[int]]:
    """Each request on its own, prefix caching off: what every variant must reproduce."""
    dtype = _invariant_dtype(conformance_target)
    core, proc = _core(tiny_model(invariant_arch), conformance_target.platform, dtype, enable_prefix_caching=False)
    tokens: dict[str, list[int]] = {}
    for req in _requests():
        tokens.update(_run(core, proc, [req]))
    return tokens


def _invariant_dtype(target: Any) -> Any:
    import torch

    # Invariants are about the engine, not rounding: fp32 where the platform has it.
    return torch.float32 if torch.float32 in target.platform.supported_dtypes else target.platform.default_dtype()


def _check(conformance: Any, got: dict[str, list[int]], alone: dict[str, list[int]], what: str) -> None:
    for rid in alone:
        conformance.assert_equal_values(got[rid], alone[rid], what=f"{what}: greedy tokens of {rid}")


def test_batched_requests_match_one_at_a_time(invariant_arch, tiny_model, alone, conformance_target, conformance) -> None:
    """All ten requests submitted together (one mixed batch per step) produce the tokens each produced alone."""
    dtype = _invariant_dtype(conformance_target)
    core, proc = _core(tiny_model(invariant_arch), conformance_target.platform, dtype, enable_prefix_caching=False)
    _check(conformance, _run(core, proc, _requests()), alone, "batched")
    conformance.note(arch=invariant_arch, dtype=dtype_name(dtype), requests=len(alone))


def test_chunked_prefill_matches_one_at_a_time(invariant_arch, tiny_model, alone, conformance_target, conformance) -> None:
    """With a budget of 8 tokens per step every longer prompt is prefilled in chunks; the tokens do not change."""
    dtype = _invariant_dtype(conformance_target)
    core, proc = _core(tiny_model(invariant_arch), conformance_target.platform, dtype, max_num_batched_tokens=8,
                       enable_prefix_caching=False)
    _check(conformance, _run(core, proc, _requests()), alone, "chunked prefill")
    conformance.note(arch=invariant_arch, dtype=dtype_name(dtype), max_num_batched_tokens=8)


def test_prefix_cache_hits_match_one_at_a_time(invariant_arch, tiny_model, alone, conformance_target, conformance) -> None:
    """With prefix caching on, a second pass over the same prompts hits the cache (counted) and the tokens do not
    change."""
    dtype = _invariant_dtype(conformance_target)
    core, proc = _core(tiny_model(invariant_arch), conformance_target.platform, dtype, enable_prefix_caching=True)
    _run(core, proc, _requests())
    again = _run(core, proc, [(f"again-{rid}", p, n) for rid, p, n in _requests()])
    stats = core.stats()
    conformance.assert_equal_values(stats.prefix_cache_hits > 0, True, what="prefix cache hits counted")
    _check(conformance, {rid.removeprefix("again-"): t for rid, t in again.items()}, alone, "prefix-cache hits")
    conformance.note(arch=invariant_arch, dtype=dtype_name(dtype), prefix_cache_hits=stats.prefix_cache_hits,
                     prefix_cache_queries=stats.prefix_cache_queries)


def test_forced_preemption_matches_one_at_a_time(invariant_arch, tiny_model, alone, conformance_target, conformance) -> None:
    """A KV cache of 8 blocks of 16 tokens cannot hold ten requests at once: requests are preempted and recomputed,
    and the tokens do not change."""
    dtype = _invariant_dtype(conformance_target)
    core, proc = _core(tiny_model(invariant_arch), conformance_target.platform, dtype, num_gpu_blocks_override=8,
                       max_num_batched_tokens=64, enable_prefix_caching=False)
    got = _run(core, proc, _requests())
    stats = core.stats()
    conformance.assert_equal_values(stats.num_preemptions > 0, True, what="preemptions happened")
    _check(conformance, got, alone, "forced preemption")
    conformance.note(arch=invariant_arch, dtype=dtype_name(dtype), num_blocks=8, preemptions=stats.num_preemptions)
