"""Bugs planted in the fused attention path make its stand-in tests fail; the unedited control passes.

Each planted backend is the real ``pagedllm_ascend.fused_attention`` source with one edit
(asserted to match exactly once, so a refactor fails loudly instead of planting nothing),
imported as its own module and run through the same check as test_ascend_fused_attention.py.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

import pagedllm_ascend.fused_attention as fused_attention
import pytest
import torch
from fused_cases import CASES, run_against_reference


@dataclass(frozen=True, slots=True)
class PlantedBug:
    name: str
    description: str
    old: str
    new: str
    cases: tuple[str, ...]  # the cases whose check must fail


BUGS = [
    PlantedBug("wrong_input_layout", "prefill passes input_layout BSH for the TND query",
               'input_layout="TND", sparse_mode=3', 'input_layout="BSH", sparse_mode=3', ("prefill", "chunked_prefill", "mixed_with_padding")),
    PlantedBug("kv_layout_mismatch", "fused attention reads the cache as (blocks, KV_N, block_size, D) while the "
               "scatter op writes (blocks, block_size, KV_N, D)",
               "q, key_cache.view(num_blocks, block_size, -1), value_cache.view(num_blocks, block_size, -1),",
               "q, key_cache.view(num_blocks, -1, block_size, key_cache.shape[-1]), "
               "value_cache.view(num_blocks, -1, block_size, key_cache.shape[-1]),",
               ("prefill", "chunked_prefill", "mixed_with_padding")),
    PlantedBug("gqa_heads_as_query_heads_prefill", "fused attention gets num_key_value_heads = query heads",
               "num_key_value_heads=spec.num_kv_heads", "num_key_value_heads=spec.num_heads",
               ("prefill", "chunked_prefill", "mixed_with_padding")),
    PlantedBug("gqa_heads_as_query_heads_decode", "paged attention gets num_kv_heads = query heads",
               "num_kv_heads=spec.num_kv_heads", "num_kv_heads=spec.num_heads", ("decode",)),
    PlantedBug("kv_lengths_cumulative", "actual_seq_lengths_kv gets cumulative ends like the query lengths",
               "actual_seq_lengths_kv=list(batch.seq_lens_cpu)",
               "actual_seq_lengths_kv=[sum(batch.seq_lens_cpu[: i + 1]) for i in range(len(batch.seq_lens_cpu))]",
               ("chunked_prefill", "mixed_with_padding")),
]


def planted_backend(bug: PlantedBug, tmp_path: Path) -> type:
    source = inspect.getsource(fused_attention)
    assert source.count(bug.old) == 1, f"planted bug {bug.name}: {bug.old!r} occurs {source.count(bug.old)} times"
    path = tmp_path / f"planted_{bug.name}.py"
    path.write_text(source.replace(bug.old, bug.new))
    spec = importlib.util.spec_from_file_location(f"planted_{bug.name}_{id(path)}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module.AscendFusedAttentionBackend


@pytest.mark.parametrize("bug", BUGS, ids=[b.name for b in BUGS])
def test_planted_fused_path_bug_fails_its_checks(bug, tmp_path) -> None:
    backend = planted_backend(bug, tmp_path)
    for case in (c for c in CASES if c.name in bug.cases):
        # A wrong number, or the op refusing the arguments as the real one would: both fail the test.
        with pytest.raises((AssertionError, ValueError)):
            run_against_reference(backend, case, torch.bfloat16)


def test_unedited_control_passes_the_same_checks(tmp_path) -> None:
    control = PlantedBug("control", "no edit", 'input_layout="TND", sparse_mode=3', 'input_layout="TND", sparse_mode=3', tuple(c.name for c in CASES))
    backend = planted_backend(control, tmp_path)
    for case in CASES:
        run_against_reference(backend, case, torch.bfloat16)
