"""Attention group: every case of the grid against the core's reference backend, KV writes slot by slot."""

from __future__ import annotations

import pytest

from pagedllm_conformance.attention_cases import (
    AttentionCase,
    attention_grid,
    copy_grid,
    run_attention_case,
    run_copy_case,
)
from pagedllm_conformance.checks import CheckRecord, Conformance
from pagedllm_conformance.pytest_plugin import session_state

# One pass of a case checks both outputs and KV writes; the half for the test not yet run waits
# here (records and messages only, no tensors) so each case's steps run once.
_PENDING: dict[tuple[str, str], tuple[CheckRecord, str | None]] = {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    state = session_state(metafunc.config)
    dtypes = state.dtypes()
    if "attention_case" in metafunc.fixturenames:
        cases = attention_grid(dtypes, state.quick)
        metafunc.parametrize("attention_case", cases, ids=[c.id for c in cases])
    if "copy_case" in metafunc.fixturenames:
        cases = copy_grid(dtypes, state.quick)
        metafunc.parametrize("copy_case", cases, ids=[c.id for c in cases])


def _check(kind: str, case: AttentionCase, target, conformance: Conformance) -> None:
    pending = _PENDING.pop((kind, case.id), None)
    if pending is None:
        other = "kv" if kind == "output" else "output"
        other_record = CheckRecord()
        failures = run_attention_case(case, target.platform, {
            kind: conformance, other: Conformance(target.manifest, other_record)})
        _PENDING[(other, case.id)] = (other_record, failures[other])
        failure = failures[kind]
    else:
        record, failure = pending
        conformance.record.tolerance = record.tolerance
        conformance.record.max_abs_err = record.max_abs_err
        conformance.record.max_rel_err = record.max_rel_err
        conformance.record.checks = record.checks
        conformance.record.details.update(record.details)
    if failure is not None:
        raise AssertionError(failure)


def test_attention_output_matches_reference(attention_case, conformance_target, conformance) -> None:
    """Each step's attention output (prefill, decode, mixed and chunked batches; GQA/MQA; sliding window;
    soft-cap; random non-contiguous block tables; stale cache contents) equals the reference backend's within
    the attention tolerance."""
    _check("output", attention_case, conformance_target, conformance)


def test_kv_cache_writes_land_in_their_slots(attention_case, conformance_target, conformance) -> None:
    """After each step, read_kv shows every new key and value in exactly its slot_mapping slot, and every
    other slot (including the one slot -1 would alias) unchanged."""
    _check("kv", attention_case, conformance_target, conformance)


def test_copy_blocks_copies_whole_blocks_exactly(copy_case, conformance_target, conformance) -> None:
    """copy_blocks over two layers makes each destination block a bit-exact copy of its source (including one
    source forked to two destinations) and leaves every other block untouched."""
    run_copy_case(copy_case, conformance_target.platform, conformance)
