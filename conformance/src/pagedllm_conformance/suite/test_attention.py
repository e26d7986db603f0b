"""Attention group: every case of the grid against the core's reference backend, KV writes slot by slot."""

from __future__ import annotations

import pytest

from pagedllm_conformance.attention_cases import attention_grid, copy_grid, run_attention_case, run_copy_case
from pagedllm_conformance.pytest_plugin import session_state


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    state = session_state(metafunc.config)
    dtypes = state.target().dtypes(state.quick)
    if "attention_case" in metafunc.fixturenames:
        cases = attention_grid(dtypes, state.quick)
        metafunc.parametrize("attention_case", cases, ids=[c.id for c in cases])
    if "copy_case" in metafunc.fixturenames:
        cases = copy_grid(dtypes, state.quick)
        metafunc.parametrize("copy_case", cases, ids=[c.id for c in cases])


def test_attention_output_matches_reference(attention_case, conformance_target, conformance) -> None:
    """Each step's attention output (prefill, decode, mixed and chunked batches; GQA/MQA; sliding window;
    soft-cap; random non-contiguous block tables; stale cache contents) equals the reference backend's within
    the attention tolerance."""
    run_attention_case(attention_case, conformance_target.platform, conformance, check="output")


def test_kv_cache_writes_land_in_their_slots(attention_case, conformance_target, conformance) -> None:
    """After each step, read_kv shows every new key and value in exactly its slot_mapping slot, and every
    other slot (including the one slot -1 would alias) unchanged."""
    run_attention_case(attention_case, conformance_target.platform, conformance, check="kv")


def test_copy_blocks_copies_whole_blocks_exactly(copy_case, conformance_target, conformance) -> None:
    """copy_blocks over two layers makes each destination block a bit-exact copy of its source (including one
    source forked to two destinations) and leaves every other block untouched."""
    run_copy_case(copy_case, conformance_target.platform, conformance)
