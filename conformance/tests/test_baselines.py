"""Baseline: the CPU plugin passes the quick suite (attention, ops and platform contract groups)."""

from __future__ import annotations


def test_cpu_quick_run_passes(suite_runs) -> None:
    run = suite_runs["cpu"]
    assert run.report is not None, run.explain()
    assert run.returncode == 0 and run.report["verdict"] == "PASS", run.explain()
