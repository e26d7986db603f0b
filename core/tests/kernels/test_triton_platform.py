"""The shared TritonPlatform pieces that do not need a GPU: memory budget, capture sizes, padding."""

from __future__ import annotations

import pytest

from pagedllm.errors import ConfigError
from pagedllm.kernels.triton.cuda_graphs import DecodeGraphRunner, default_capture_sizes
from pagedllm.kernels.triton.platform import memory_budget

GIB = 2**30


def test_memory_budget_counts_memory_already_in_use_against_the_fraction() -> None:
    # 80 GiB device, 20 GiB used (weights, other processes): 0.9 leaves 72 - 20 = 52 GiB.
    assert memory_budget(80 * GIB, 60 * GIB, 0.9) == int(80 * GIB * 0.9) - 20 * GIB


def test_memory_budget_never_exceeds_free_memory() -> None:
    assert memory_budget(80 * GIB, 80 * GIB, 1.0) == 80 * GIB


def test_memory_budget_too_small_fraction_names_the_option() -> None:
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        memory_budget(80 * GIB, 30 * GIB, 0.5)


def test_capture_sizes_cover_one_to_max_num_seqs() -> None:
    assert default_capture_sizes(4) == [1, 2, 4]
    assert default_capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert default_capture_sizes(10_000)[-1] == 512


def test_decode_graphs_pad_to_the_next_captured_size() -> None:
    graphs = DecodeGraphRunner(lambda n: None, [8, 1, 4, 2])  # type: ignore[arg-type,return-value]
    assert [graphs.padded_size(n) for n in (1, 3, 5, 8, 9)] == [1, 4, 8, 8, None]
    with pytest.raises(ValueError, match="no decode graph"):
        graphs.replay(3)  # nothing captured (no GPU here): a clear error, never a crash
