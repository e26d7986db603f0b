"""The thread count follows other processes' use of our cores; kernels stay correct beside a busy neighbour."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pagedllm.plugin import EngineConfig
from pagedllm_cpu import contention
from pagedllm_cpu.contention import AdaptiveThreads, CpuSample, others_cores, threads_for
from pagedllm_cpu.kernels import clib
from pagedllm_cpu.platform import THREADS_ENV, CpuPlatform

STAT = """cpu  900 0 300 5000 10 0 5 0 0 0
cpu0 400 0 100 2500 5 0 5 0 0 0
cpu1 500 0 200 2500 5 0 0 7 0 0
intr 12345
"""


def test_busy_time_counts_all_but_idle_and_iowait_on_our_cpus(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(STAT)
    tick = os.sysconf("SC_CLK_TCK")
    assert contention.busy_seconds([0], str(stat)) == pytest.approx(505 / tick)
    assert contention.busy_seconds([0, 1], str(stat)) == pytest.approx((505 + 707) / tick)  # steal counts
    assert contention.busy_seconds([0], str(tmp_path / "missing")) is None


def test_the_process_that_started_the_engine_counts_as_ours() -> None:
    # When serving, the API server is the engine's parent: its CPU time is not a neighbour's.
    parent = contention.process_cpu_seconds(os.getppid())
    assert parent >= 0.0 and contention.process_cpu_seconds(2**31 - 1) == 0.0  # no such process
    own = os.times()
    now = contention.sample([0])
    assert now is not None and now.ours >= own.user + own.system


def test_others_use_is_the_busy_time_this_process_did_not_spend() -> None:
    before, after = CpuSample(0.0, 100.0, 10.0), CpuSample(2.0, 103.0, 11.0)
    assert others_cores(before, after) == pytest.approx(1.0)  # 3 busy seconds, 1 ours, over 2 s
    assert others_cores(before, CpuSample(2.0, 101.0, 11.0)) == 0.0


@pytest.mark.parametrize(
    ("cores", "others", "threads"),
    [(2, 0.0, 2), (2, 0.3, 2), (2, 0.5, 1), (2, 1.0, 1), (2, 2.0, 1), (8, 1.0, 7), (8, 2.7, 5), (1, 3.0, 1)],
)
def test_one_thread_per_core_the_neighbours_leave(cores: int, others: float, threads: int) -> None:
    assert threads_for(cores, others) == threads


class _Clock:
    """Samples of our choosing: others use `others` cores' worth over each 1 s window."""

    def __init__(self) -> None:
        self.t, self.busy, self.others = 0.0, 0.0, 0.0

    def read(self) -> CpuSample:
        return CpuSample(self.t, self.busy, 0.0)

    def advance(self, others: float) -> None:
        self.t += 1.0
        self.busy += others


def test_adaptive_threads_drop_while_a_neighbour_runs_and_come_back_after(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(contention.time, "monotonic", lambda: clock.t)
    adaptive = AdaptiveThreads([0, 1], cores=2, interval_s=0.5, read=clock.read)
    assert adaptive.update() is None  # no window has passed
    clock.advance(1.0)  # a CPU-bound neighbour
    assert adaptive.update() == 1 and adaptive.threads == 1
    clock.advance(1.0)
    assert adaptive.update() is None
    clock.advance(0.0)  # it stopped: the smoothed use is 0.5, still a taken core
    assert adaptive.update() is None
    clock.advance(0.0)
    assert adaptive.update() == 2
    assert "2 threads (adapts" in adaptive.describe()


def test_the_platform_applies_the_count_at_the_end_of_each_step(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(contention.time, "monotonic", lambda: clock.t)
    platform = CpuPlatform()
    platform.adaptive = AdaptiveThreads([0, 1], cores=2, interval_s=0.5, read=clock.read)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        clock.advance(1.0)
        platform.synchronize()  # what the model runner calls after every step
        assert torch.get_num_threads() == 1
        assert "1 thread (adapts" in platform.describe()["contention"]
    finally:
        torch.set_num_threads(threads)


def test_a_fixed_thread_count_or_tensor_parallel_ranks_do_not_adapt(monkeypatch) -> None:
    platform = CpuPlatform()
    platform._threads = 2
    config = EngineConfig()
    monkeypatch.setenv(THREADS_ENV, "2")
    platform._start_adapting(config)
    assert platform.adaptive is None
    monkeypatch.delenv(THREADS_ENV)
    config.parallel.tensor_parallel_size = 2
    platform._start_adapting(config)
    assert platform.adaptive is None


def test_oversubscribed_cores_are_reported(monkeypatch) -> None:
    monkeypatch.setattr(contention.os, "getloadavg", lambda: (3.2, 1.0, 1.0))
    assert "load average 3.2 over the 2 cores" in contention.load_note(2)
    assert "oversubscribed" in CpuPlatform().describe()["contention"]
    monkeypatch.setattr(contention.os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    assert contention.load_note(2) is None


needs_kernels = pytest.mark.skipif(
    clib.status()[0] is None, reason=f"C kernels unavailable: {clib.status()[1]}"
)


@needs_kernels
def test_kernels_follow_the_current_thread_count_so_captured_steps_do_too() -> None:
    # Captured decode steps record the kernels' arguments once; the thread count is not baked in.
    kernels, _ = clib.status()
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert kernels.lib.pagedllm_kernel_threads(clib.CURRENT_THREADS) == n
        assert kernels.lib.pagedllm_kernel_threads(3) == 3  # an explicit count still wins
    finally:
        torch.set_num_threads(threads)


@needs_kernels
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_kernels_beside_a_busy_process_on_one_of_our_cores_give_the_same_results() -> None:
    kernels, _ = clib.status()
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(576, 576, generator=gen), torch.randn(16, 576, generator=gen)
    panels = kernels.gemm_pack(w)
    quiet = kernels.gemm(x, panels, 576, None)
    core = min(os.sched_getaffinity(0))
    hog = subprocess.Popen(
        [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"]
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for _ in range(20):
            assert torch.equal(kernels.gemm(x, panels, 576, None), quiet)
    finally:
        torch.set_num_threads(threads)
        hog.kill()
        hog.wait()
