"""The console script: errors it reports before running, and the shape of the JSON it writes."""

from __future__ import annotations

import json
import subprocess
import sys


def test_unknown_platform_exits_3_with_the_plugin_table() -> None:
    proc = subprocess.run([sys.executable, "-m", "pagedllm_conformance", "--platform", "no_such_backend"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert "no_such_backend" in proc.stderr and "cpu" in proc.stderr


def test_report_json_is_valid_json_with_one_row_per_test(suite_runs) -> None:
    r = suite_runs["cpu"].report
    assert r is not None
    json.dumps(r)
    ids = [t["nodeid"] for t in r["tests"]]
    assert len(ids) == len(set(ids)) == r["summary"]["total"]
