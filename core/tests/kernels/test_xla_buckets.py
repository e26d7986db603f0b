"""Shape buckets of the XLA machinery (pure Python: runs without torch-xla)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from pagedllm.errors import ConfigError


def buckets_module():
    # kernels/xla/__init__ needs torch_xla; the bucket arithmetic itself does not.
    spec = importlib.util.spec_from_file_location(
        "xla_buckets", importlib.util.find_spec("pagedllm").submodule_search_locations[0] + "/kernels/xla/buckets.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("xla_buckets", module)
    spec.loader.exec_module(module)
    return module


def test_token_buckets_double_up_to_the_gap_then_step_by_it() -> None:
    b = buckets_module()
    assert b.padded_sizes(16, 2048, 512) == [16, 32, 64, 128, 256, 512, 1024, 1536, 2048]
    assert b.padded_sizes(16, 100) == [16, 32, 64, 128]


def test_select_takes_the_smallest_bucket_and_refuses_a_step_beyond_all() -> None:
    b = buckets_module()
    grid = b.ShapeBuckets.build(64, 8, 16, min_tokens=16, min_blocks=8)
    assert grid.tokens == (16, 32, 64) and grid.blocks == (8, 16) and len(grid) == 6
    chosen = grid.select(17, 3, 9)
    assert (chosen.num_tokens, chosen.num_seqs, chosen.num_blocks) == (32, 8, 16)
    assert grid.select(5, 5, 1).num_seqs == 8  # sequences follow the token bucket, capped by max_num_seqs
    with pytest.raises(ConfigError, match="exceeds the largest shape bucket"):
        grid.select(65, 1, 1)
