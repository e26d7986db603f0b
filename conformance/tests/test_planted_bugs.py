"""Proof of teeth: deliberately broken backends, installed as real plugins, must each fail the suite."""

from __future__ import annotations

import pytest
from conformance_planted import PLANTED_BUGS, SOUND_CONTROL, PlantedBug


def test_the_sound_control_adds_no_failure_of_its_own(suite_runs) -> None:
    """The wrapper every planted bug is built from, with no bug, fails nothing the CPU plugin itself passes: the
    failures below come from the bugs, not from the harness."""
    control, cpu = suite_runs[SOUND_CONTROL.name], suite_runs["cpu"]
    assert control.report is not None and cpu.report is not None, control.explain() + cpu.explain()
    assert any(t["outcome"] == "passed" for t in control.report["tests"]), control.explain()
    assert set(control.failed_tests()) <= set(cpu.failed_tests()), control.explain()


@pytest.mark.parametrize("bug", PLANTED_BUGS, ids=[b.name for b in PLANTED_BUGS])
def test_planted_bug_fails_the_suite_and_the_report_names_the_test(bug: PlantedBug, suite_runs) -> None:
    """Each planted bug fails its run (exit 1, FAIL verdict) with at least one expected test failing that
    passes on the sound control (the same wrapper without the bug), named in the report and on the console."""
    run, control = suite_runs[bug.name], suite_runs[SOUND_CONTROL.name]
    assert run.report is not None, run.explain()
    assert run.returncode == 1, run.explain()
    assert run.report["verdict"] == "FAIL" and run.report["verdict_line"].startswith(f"FAIL: {bug.name} ")
    baseline = set(control.failed_tests())
    caught = [t for t in run.failed_tests()
              if t not in baseline and any(f"::{name}[" in t for name in bug.must_fail)]
    assert caught, f"{bug.name} ({bug.description}) was not caught by {bug.must_fail}\n{run.explain()}"
    # The console names the failing test too, not only the JSON report.
    assert any(t.split("::", 1)[1] in run.stdout for t in caught), run.explain()
    # The failure says what was wrong: a message, not just an outcome.
    reasons = [t["reason"] for t in run.report["tests"] if t["nodeid"] in caught]
    assert all(r and ("tolerance" in r or "Error" in r or "got" in r) for r in reasons), reasons


def test_eps_outside_the_square_root_is_caught_by_the_edge_magnitude_cases(suite_runs) -> None:
    """The rms_norm override that model parity once caught alone fails the ops group on its own, through
    the rows whose mean square is near eps (every ordinary case passes it)."""
    run, control = suite_runs["planted_eps"], suite_runs[SOUND_CONTROL.name]
    failed = set(run.failed_tests()) - set(control.failed_tests())
    assert failed and all("test_op_matches_native_default[rms_norm-edge-" in t for t in failed), run.explain()
