"""The pytest plugin (pytest11): selects the platform under test, applies its manifest, records the report.

It is loaded into every pytest run of an environment where pagedllm-conformance is installed,
so it stays inert unless the session collects tests from the conformance suite.
"""

from __future__ import annotations

import datetime as dt
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pagedllm_conformance.report import (
    DECLARED_SKIP,
    ERROR,
    FAILED,
    PASSED,
    STATED_SKIP,
    UNDECLARED_SKIP,
    ReportRow,
    RunReport,
)

# Loaded into every pytest run of the environment: torch, pagedllm and the suite's machinery are
# imported only once a session actually collects conformance tests.
if TYPE_CHECKING:
    import torch

    from pagedllm_conformance.checks import CheckRecord, Conformance
    from pagedllm_conformance.manifest import Exclusion
    from pagedllm_conformance.target import PlatformUnderTest

SUITE_DIR = (Path(__file__).parent / "suite").resolve()


class ConformanceSession:
    """Per-pytest-session state: the target, the per-test records and the report being built."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.platform_name: str | None = config.getoption("conformance_platform")
        self.quick: bool = bool(config.getoption("conformance_quick"))
        self.report_path: str | None = config.getoption("conformance_report")
        self.dtype_names: list[str] = list(config.getoption("conformance_dtype") or [])
        self.active = False
        self.started = time.time()
        self._target: PlatformUnderTest | None = None
        self.ids: dict[str, tuple[str, str]] = {}  # pytest nodeid -> (suite id, group)
        self.records: dict[str, CheckRecord] = {}
        self.results: dict[str, ReportRow] = {}
        self.declared: dict[str, Exclusion] = {}
        self.skip_kind: dict[str, str] = {}
        self.failure_text: dict[str, str] = {}
        self.checks_described: dict[str, str] = {}
        self.report: RunReport | None = None
        self.written: tuple[Path, Path] | None = None

    def target(self) -> PlatformUnderTest:
        """Select the platform on first use; selection problems are usage errors with discovery's table."""
        if self._target is None:
            from pagedllm.errors import PlatformError, PluginVersionError

            from pagedllm_conformance.manifest import ManifestError
            from pagedllm_conformance.target import select_target

            try:
                self._target = select_target(self.platform_name)
            except (PlatformError, PluginVersionError, ManifestError) as exc:
                raise pytest.UsageError(f"pagedllm-conformance: {exc}") from exc
            self.active = True
        return self._target

    def dtypes(self) -> list[torch.dtype]:
        """The dtypes this run exercises: the grid's choice, narrowed by --conformance-dtype."""
        from pagedllm_conformance.manifest import DTYPE_NAMES, dtype_name

        chosen = self.target().dtypes(self.quick)
        if not self.dtype_names:
            return chosen
        unknown = [n for n in self.dtype_names if n not in DTYPE_NAMES]
        if unknown:
            raise pytest.UsageError(f"unknown dtype {unknown[0]!r}; use one of {', '.join(DTYPE_NAMES)}")
        wanted = [DTYPE_NAMES[n] for n in self.dtype_names]
        supported = self.target().platform.supported_dtypes
        missing = [dtype_name(d) for d in wanted if d not in supported]
        if missing:
            raise pytest.UsageError(f"dtype {missing[0]} is not supported by platform {self.target().name}")
        return wanted


STATE = pytest.StashKey[ConformanceSession]()


def session_state(config: pytest.Config) -> ConformanceSession:
    return config.stash[STATE]


def is_suite_path(path: Path | str) -> bool:
    try:
        return Path(path).resolve().is_relative_to(SUITE_DIR)
    except OSError:
        return False


def suite_id(item: pytest.Item) -> tuple[str, str]:
    """(``file::name[params]`` relative to the suite, group) — what manifests and reports name."""
    rel = Path(item.path).resolve().relative_to(SUITE_DIR).as_posix()
    rest = item.nodeid.split("::")[1:]
    stem = Path(rel).stem
    group = stem.removeprefix("test_")
    return "::".join([rel, *rest]), group


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pagedllm-conformance", "pagedllm conformance suite")
    group.addoption(
        "--conformance-platform",
        default=None,
        help="platform plugin (entry-point name) under test; default: what the server would select",
    )
    group.addoption("--conformance-quick", action="store_true", help="run the reduced grids")
    group.addoption("--conformance-dtype", action="append", default=None,
                    help="only this dtype (repeatable); default: fp32 and the platform's default dtype")
    group.addoption(
        "--conformance-report",
        default=None,
        help="write the JSON report here, and its Markdown twin next to it (.md)",
    )


def pytest_configure(config: pytest.Config) -> None:
    state = ConformanceSession(config)
    config.stash[STATE] = state
    config.pluginmanager.register(SessionHooks(state), "pagedllm-conformance-session")


def _build_report(state: ConformanceSession, session: pytest.Session) -> RunReport:
    from pagedllm_conformance.manifest import TOLERANCE_GROUPS, dtype_name

    target = state.target()
    tests = list(state.results.values())
    matched: dict[int, list[str]] = {}
    for nodeid, exclusion in state.declared.items():
        if nodeid in state.results:
            matched.setdefault(id(exclusion), []).append(state.ids[nodeid][0])
    deviations: list[dict[str, Any]] = []
    unused: list[dict[str, Any]] = []
    for exclusion in target.manifest.exclusions:
        hits = matched.get(id(exclusion), [])
        row = {"kind": "exclusion", "test": exclusion.test, "reason": exclusion.reason, "matched": hits}
        (deviations if hits else unused).append(row)
    deviations += target.manifest.tolerance_deviations()
    tolerances = {
        dtype_name(d): {g: target.manifest.tolerance(d, g).as_dict() for g in TOLERANCE_GROUPS}
        for d in state.dtypes()
    }
    problems = []
    if not tests:
        problems.append("no conformance test ran")
    elif not any(t.outcome == PASSED for t in tests):
        problems.append("no conformance test passed")
    finished = time.time()
    run = {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "quick": state.quick,
        "keyword": session.config.getoption("keyword") or None,
        "dtypes": [dtype_name(d) for d in state.dtypes()],
        "dtype_restricted": bool(state.dtype_names),
        "started": dt.datetime.fromtimestamp(state.started, dt.timezone.utc).isoformat(timespec="seconds"),
        "finished": dt.datetime.fromtimestamp(finished, dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(finished - state.started, 2),
        "collected": len(state.ids),
        "ran": len(tests),
    }
    # Scenario names appear in test ids; their meaning goes into the report once.
    scenarios = {t.details["scenario"]: t.details["description"] for t in tests
                 if "scenario" in t.details and "description" in t.details}
    if scenarios:
        run["attention_scenarios"] = dict(sorted(scenarios.items()))
    return RunReport(
        environment=target.describe(),
        run=run,
        tests=tests,
        declared_deviations=deviations,
        unused_exclusions=unused,
        tolerances=tolerances,
        checks_described=dict(sorted(state.checks_described.items())),
        problems=problems,
    )


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


class SessionHooks:
    """Hooks bound to one session's state (registered in pytest_configure)."""

    def __init__(self, state: ConformanceSession) -> None:
        self.state = state

    def pytest_collection_modifyitems(self, session: pytest.Session, items: list[pytest.Item]) -> None:
        state = self.state
        suite_items = [item for item in items if is_suite_path(item.path)]
        if not suite_items:
            return
        target = state.target()
        for item in suite_items:
            sid, group = suite_id(item)
            state.ids[item.nodeid] = (sid, group)
            fn = getattr(item, "function", None)
            if fn is not None and fn.__doc__:
                key = f"{sid.split('::')[0]}::{fn.__name__}"
                state.checks_described[key] = " ".join(fn.__doc__.strip().split("\n\n")[0].split())
            exclusion = target.manifest.exclusion_for(sid)
            if exclusion is not None:
                state.declared[item.nodeid] = exclusion
                item.add_marker(pytest.mark.skip(reason=f"declared deviation: {exclusion.reason}"))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
        report = yield
        state = self.state
        if item.nodeid not in state.ids:
            return report
        if report.skipped and not hasattr(report, "wasxfail"):
            record = state.records.get(item.nodeid)
            if item.nodeid in state.declared:
                state.skip_kind[item.nodeid] = DECLARED_SKIP
            elif record is not None and record.stated_skip is not None:
                state.skip_kind[item.nodeid] = STATED_SKIP
            else:
                # The one rule that keeps a backend honest: nothing may be skipped unless declared.
                reason = _skip_reason(report)
                state.skip_kind[item.nodeid] = UNDECLARED_SKIP
                report.outcome = "failed"
                report.longrepr = (
                    f"undeclared skip: {reason}\nThe platform's conformance.toml declares no exclusion for "
                    f"{state.ids[item.nodeid][0]}; declare one with its reason, or make the test pass."
                )
                state.failure_text[item.nodeid] = f"undeclared skip: {reason}"
        elif report.failed and call.excinfo is not None and item.nodeid not in state.failure_text:
            state.failure_text[item.nodeid] = call.excinfo.exconly().strip()[:2000]
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        state = self.state
        if report.nodeid not in state.ids:
            return
        sid, group = state.ids[report.nodeid]
        result = state.results.get(report.nodeid)
        if result is None:
            result = state.results[report.nodeid] = ReportRow(nodeid=sid, group=group, outcome=PASSED)
        result.duration_s += report.duration
        kind = state.skip_kind.get(report.nodeid)
        if kind == UNDECLARED_SKIP and report.failed:
            result.outcome = UNDECLARED_SKIP
            result.reason = state.failure_text.get(report.nodeid)
        elif report.failed:
            if result.outcome != UNDECLARED_SKIP:
                result.outcome = FAILED if report.when == "call" else ERROR
                result.reason = state.failure_text.get(report.nodeid) or report.longreprtext[-2000:]
        elif report.skipped and kind is not None:
            result.outcome = kind
            result.reason = _skip_reason(report)
        record = state.records.get(report.nodeid)
        if record is not None:
            result.tolerance = record.tolerance
            result.max_abs_err = record.max_abs_err
            result.max_rel_err = record.max_rel_err
            result.checks = record.checks
            result.details = record.details

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        state = self.state
        if not state.active or session.config.getoption("collectonly"):
            return
        state.report = _build_report(state, session)
        if state.report_path:
            state.written = state.report.write(state.report_path)
        if not state.report.passed and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        state = self.state
        if state.report is None:
            return
        tr = terminalreporter
        tr.section("pagedllm conformance")
        for d in state.report.declared_deviations:
            if d["kind"] == "exclusion":
                tr.write_line(f"declared exclusion {d['test']!r} ({len(d['matched'])} tests): {d['reason']}")
            else:
                tr.write_line(
                    f"declared tolerance {d['dtype']} {d['group']}: atol {d['atol']:g} rtol {d['rtol']:g} "
                    f"(default atol {d['default_atol']:g} rtol {d['default_rtol']:g})"
                )
        if state.written:
            tr.write_line(f"report: {state.written[0]} and {state.written[1]}")
        passed = state.report.passed
        tr.write_line(state.report.verdict_line(), bold=True, green=passed, red=not passed)


@pytest.fixture(scope="session")
def conformance_target(request: pytest.FixtureRequest) -> PlatformUnderTest:
    """The platform under test (selected through discovery) with its manifest."""
    return session_state(request.config).target()


@pytest.fixture(scope="session")
def conformance_quick(request: pytest.FixtureRequest) -> bool:
    return session_state(request.config).quick


@pytest.fixture
def conformance(request: pytest.FixtureRequest, conformance_target: PlatformUnderTest) -> Conformance:
    """Tolerance-aware checks whose worst errors are recorded for this test's report row."""
    from pagedllm_conformance.checks import CheckRecord, Conformance

    state = session_state(request.config)
    record = state.records.setdefault(request.node.nodeid, CheckRecord())
    return Conformance(conformance_target.manifest, record)
