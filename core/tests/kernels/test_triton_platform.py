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


def test_interpreter_mode_sizes_the_kv_cache_from_memavailable_not_memfree(tmp_path, monkeypatch) -> None:
    # After installs fill the page cache MemFree is ~1% of RAM while MemAvailable is most of it:
    # the interpreter platforms must budget from MemAvailable, as the CPU platform does.
    from types import SimpleNamespace

    from pagedllm.kernels.triton.platform import TritonInterpreterMode
    from pagedllm.platforms import host_memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal:       24735232 kB\nMemFree:          251904 kB\nMemAvailable:   20971520 kB\n"
    )
    monkeypatch.setattr(host_memory, "MEMINFO", str(meminfo))
    platform = object.__new__(TritonInterpreterMode)  # no interpreter needed to size memory
    assert platform.free_memory() == 20971520 * 1024
    assert platform.total_memory() == 24735232 * 1024
    config = SimpleNamespace(cache=SimpleNamespace(kv_cache_memory=None, gpu_memory_utilization=0.9))
    # 0.9 of 23.6 GiB, less the 3.6 GiB in use: about 17.7 GiB, where MemFree gave a ConfigError.
    assert platform.kv_cache_budget(config) == int(24735232 * 1024 * 0.9) - (24735232 - 20971520) * 1024
