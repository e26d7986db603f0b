"""The console script: errors it reports before running, and the shape of the JSON it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pagedllm_conformance.report import FAILED, PASSED


def test_cpu_quick_run_writes_a_complete_json_and_markdown_report(suite_runs) -> None:
    """Whatever the verdict, the report names the platform, plugin, versions, device and scope, and every
    attention row carries the tolerance it used and the worst error it saw."""
    run = suite_runs["cpu"]
    assert run.report is not None, run.explain()
    r = run.report
    assert r["platform"]["name"] == "cpu" and r["plugin"]["distribution"] == "pagedllm-cpu"
    assert r["versions"]["torch"] and r["versions"]["pagedllm"] and r["device"]["name"]
    assert r["run"]["quick"] is True and r["run"]["keyword"] == "attention or ops or platform"
    groups = set(r["groups"])
    assert {"attention", "ops", "platform_contract"} <= groups
    attention = [t for t in r["tests"] if t["group"] == "attention" and t["outcome"] in (PASSED, FAILED)]
    assert attention and all(t["tolerance"] and t["max_abs_err"] is not None and t["checks"] > 0 for t in attention)
    assert r["verdict_line"].startswith(f"{r['verdict']}: cpu (pagedllm-cpu ")
    md = Path(run.report_path).with_suffix(".md").read_text()
    assert r["verdict_line"] in md and "## Declared deviations" in md and "## What each test checks" in md


def test_unknown_platform_exits_3_with_the_plugin_table() -> None:
    proc = subprocess.run([sys.executable, "-m", "pagedllm_conformance", "--platform", "no_such_backend"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert "no_such_backend" in proc.stderr and "cpu" in proc.stderr


def test_report_json_is_valid_json_with_one_row_per_test(suite_runs) -> None:
    r = suite_runs["cpu"].report
    assert r is not None
    json.dumps(r, allow_nan=False)  # strict JSON: no Infinity or NaN literals
    ids = [t["nodeid"] for t in r["tests"]]
    assert len(ids) == len(set(ids)) == r["summary"]["total"]
