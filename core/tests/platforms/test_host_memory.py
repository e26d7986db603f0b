"""Host memory for the platforms whose device is the host: MemAvailable, never MemFree."""

from __future__ import annotations

from pathlib import Path

import pytest
from pagedllm.platforms import host_memory
from pagedllm.plugin import host_available_memory, host_total_memory

GiB = 1 << 30

# A host whose page cache is full: almost nothing is "free", but most of it is reclaimable.
PAGE_CACHE_FULL = """MemTotal:       24735232 kB
MemFree:          251904 kB
MemAvailable:   20971520 kB
Buffers:          102400 kB
Cached:         19922944 kB
"""


@pytest.fixture
def page_cache_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(PAGE_CACHE_FULL)
    monkeypatch.setattr(host_memory, "MEMINFO", str(meminfo))


def test_available_memory_counts_reclaimable_page_cache(page_cache_full: None) -> None:
    assert host_available_memory() == 20971520 * 1024
    assert host_total_memory() == 24735232 * 1024


def test_without_proc_meminfo_sysconf_is_the_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host_memory, "MEMINFO", str(tmp_path / "missing"))
    assert host_total_memory() >= host_available_memory() > 0


def test_the_cpu_platform_and_the_triton_interpreter_share_the_function() -> None:
    # One definition of "free host memory" for every platform whose device is the host.
    import pagedllm.plugin as api

    assert api.host_available_memory is host_memory.host_available_memory
