"""Tensor parallel group: a tiny model at tensor parallel 2 on the platform generates what world size 1 generates."""

from __future__ import annotations

from typing import Any

import pytest

from pagedllm_conformance.generation import assert_parity, generate
from pagedllm_conformance.manifest import dtype_name
from pagedllm_conformance.pytest_plugin import session_state

TP = 2
PROMPTS = (
    "The quick brown fox",
    "a",
    "Paged attention keeps the KV cache in fixed-size blocks; count them all.",
)
MAX_TOKENS = 32


def _ranks_possible(platform: Any) -> tuple[bool, str]:
    # Processes can share a CPU; any other device type needs one device per rank.
    if platform.device_type == "cpu" or platform.device_count() >= TP:
        return True, ""
    return False, (f"platform {platform.name} reports {platform.device_count()} {platform.device_type} device(s); "
                   f"tensor parallel {TP} needs one device per rank")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "tp_case" in metafunc.fixturenames:
        state = session_state(metafunc.config)
        dtype = state.dtypes()[0]
        cases = [(arch, dtype) for arch in (("llama",) if state.quick else ("llama", "qwen3", "gemma2"))]
        metafunc.parametrize("tp_case", cases, ids=[f"{a}-{dtype_name(d)}" for a, d in cases])


def test_tensor_parallel_2_greedy_generation_matches_world_size_1(tp_case, tiny_model, conformance_target,
                                                                  conformance) -> None:
    """A tiny random model (Llama; in a full run also Qwen3 and Gemma-2) run at tensor parallel 2 (the multiprocess
    executor: a process per rank, heads, MLP and vocabulary split across ranks, all-reduce and all-gather through the
    platform's Communicator) generates the same 32 greedy tokens on the platform as world size 1 on the platform,
    logprobs of the top-5 tokens within the logprobs tolerance, under the model-parity near-tie rule. Skipped with
    the reason where the platform has fewer devices than ranks."""
    platform = conformance_target.platform
    ok, reason = _ranks_possible(platform)
    if not ok:
        conformance.skip_stated(reason)
    tp_arch, dtype = tp_case
    path = tiny_model(tp_arch)
    one = generate(path, platform, dtype, PROMPTS, MAX_TOKENS)
    two = generate(path, platform, dtype, PROMPTS, MAX_TOKENS, tensor_parallel_size=TP)
    conformance.note(model=f"tiny random {tp_arch}", prompts=list(PROMPTS), max_tokens=MAX_TOKENS,
                     dtype=dtype_name(dtype), tensor_parallel_size=TP, executor="mp", reference="world size 1")
    assert_parity(two, one, conformance, dtype, PROMPTS)
