"""The report's verdict: any failure or undeclared skip fails it, declared deviations are counted, not hidden."""

from __future__ import annotations

from pagedllm_conformance.report import (
    DECLARED_SKIP,
    FAILED,
    PASSED,
    UNDECLARED_SKIP,
    ReportRow,
    RunReport,
    render_markdown,
)

ENV = {
    "platform": {"name": "x", "class": "m.X", "device_type": "cpu", "dist_backend": "gloo", "priority": 0,
                 "supported_dtypes": ["float32"], "verified_on": "here", "selected_because": "asked"},
    "plugin": {"entry_point": "x", "distribution": "pagedllm-x", "version": "1.2", "module": "m.hooks",
               "api_version": "1.0", "manifest": "m/conformance.toml"},
    "versions": {"torch": "2"},
    "host": {"os": "linux", "machine": "x86_64", "processor": "x86_64"},
    "device": {"name": "d", "count": 1},
}


def report(*outcomes: str, deviations: list | None = None) -> RunReport:
    tests = [ReportRow(nodeid=f"test_a.py::t[{i}]", group="a", outcome=o) for i, o in enumerate(outcomes)]
    return RunReport(environment=ENV, run={"quick": False, "keyword": None, "duration_s": 1.0}, tests=tests,
                     declared_deviations=deviations or [], unused_exclusions=[], tolerances={},
                     checks_described={"test_a.py::t": "checks a"})


def test_all_passed_is_a_pass_naming_plugin_and_version() -> None:
    r = report(PASSED, PASSED)
    assert r.passed
    assert r.verdict_line().startswith("PASS: x (pagedllm-x 1.2) — 2 passed, 0 failed")


def test_undeclared_skip_fails_the_verdict() -> None:
    r = report(PASSED, UNDECLARED_SKIP)
    assert not r.passed and "1 undeclared skips" in r.verdict_line()


def test_failure_fails_and_declared_skip_does_not() -> None:
    assert not report(PASSED, FAILED).passed
    dev = [{"kind": "exclusion", "test": "test_a.py::t[1]", "reason": "why", "matched": ["test_a.py::t[1]"]}]
    r = report(PASSED, DECLARED_SKIP, deviations=dev)
    assert r.passed and "1 declared deviations" in r.verdict_line()


def test_nothing_passed_is_not_a_pass() -> None:
    assert not report(DECLARED_SKIP).passed
    assert not report().passed


def test_markdown_states_verdict_deviations_and_every_test() -> None:
    dev = [{"kind": "exclusion", "test": "test_a.py::t[1]", "reason": "no kernel yet", "matched": ["test_a.py::t[1]"]}]
    r = report(PASSED, DECLARED_SKIP, deviations=dev)
    md = render_markdown(r.as_dict())
    assert r.verdict_line() in md
    assert "no kernel yet" in md and "`test_a.py::t[0]`" in md and "`test_a.py::t[1]`" in md
    assert "checks a" in md
