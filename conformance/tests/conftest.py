"""Shared fixture of the conformance self-tests: every suite run they inspect, started at once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The planted plugins' code lives next to the tests; subprocesses get it through PYTHONPATH.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conformance_planted import (  # noqa: E402
    PLANTED_BUGS,
    SKIPPY_DECLARED,
    SKIPPY_UNDECLARED,
    SOUND_CONTROL,
    RunResult,
    build_site,
)
from conformance_planted.site import finish, start_conformance  # noqa: E402

CPU_KEYWORD = "attention or ops or platform"


@pytest.fixture(scope="session")
def suite_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunResult]:
    """Runs of the real `pagedllm-conformance` in subprocesses, side by side (they are mostly imports):
    every planted bug, the sound control and the two skip variants from a temporary plugin site, and
    the CPU plugin itself. Keyed by platform name."""
    bugs = [*PLANTED_BUGS, SOUND_CONTROL, SKIPPY_UNDECLARED, SKIPPY_DECLARED]
    site = build_site(tmp_path_factory.mktemp("planted-site"), bugs)
    reports = tmp_path_factory.mktemp("reports")
    started = {}
    for bug in bugs:
        report = reports / f"{bug.name}.json"
        args = ["--quick", "--dtype", "float32", "-k", bug.keyword]
        started[bug.name] = (start_conformance(site, bug.name, args, report), report)
    cpu_report = reports / "cpu" / "cpu.json"
    started["cpu"] = (start_conformance(site, "cpu", ["--quick", "--dtype", "float32", "-k", CPU_KEYWORD],
                                        cpu_report), cpu_report)
    return {name: finish(proc, report) for name, (proc, report) in started.items()}

