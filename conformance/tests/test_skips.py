"""An undeclared skip fails the run; the same skip declared in the backend's manifest is a listed deviation."""

from __future__ import annotations

from conformance_planted import SKIPPY_DECLARED, SKIPPY_UNDECLARED


def test_undeclared_skip_fails_the_run(suite_runs) -> None:
    run = suite_runs[SKIPPY_UNDECLARED.name]
    assert run.report is not None, run.explain()
    assert run.returncode == 1 and run.report["verdict"] == "FAIL", run.explain()
    undeclared = [t for t in run.report["tests"] if t["outcome"] == "undeclared skip"]
    assert undeclared and all("-hs80-" in t["nodeid"] for t in undeclared)
    assert all("no kernel for head size 80" in t["reason"] for t in undeclared)
    assert run.report["summary"]["undeclared_skips"] == len(undeclared)
    assert f"{len(undeclared)} undeclared skips" in run.report["verdict_line"]
    assert any(t["outcome"] == "passed" for t in run.report["tests"])


def test_declared_exclusion_passes_and_is_listed_as_a_deviation(suite_runs, tmp_path) -> None:
    run = suite_runs[SKIPPY_DECLARED.name]
    assert run.report is not None, run.explain()
    assert run.returncode == 0 and run.report["verdict"] == "PASS", run.explain()
    skipped = [t for t in run.report["tests"] if t["outcome"] == "skipped (declared deviation)"]
    assert skipped and all("-hs80-" in t["nodeid"] for t in skipped)
    (deviation,) = [d for d in run.report["declared_deviations"] if d["kind"] == "exclusion"]
    assert deviation["reason"] == "no kernel for head size 80 yet"
    assert sorted(deviation["matched"]) == sorted(t["nodeid"] for t in skipped)
    assert run.report["platform"]["verified_on"] == "conformance self-test"
    assert "1 declared deviations" in run.report["verdict_line"]
