"""The conformance report: one record per test, a verdict, and the JSON and Markdown renderings."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT_SCHEMA = "pagedllm-conformance-report/1"

# Outcomes of a test as the report states them. Only the first two skip kinds are allowed.
PASSED = "passed"
FAILED = "failed"
ERROR = "error"
DECLARED_SKIP = "skipped (declared deviation)"
STATED_SKIP = "skipped (stated by the suite)"
UNDECLARED_SKIP = "undeclared skip"
FAILING_OUTCOMES = (FAILED, ERROR, UNDECLARED_SKIP)


def _finite_or_text(value: float | None) -> float | str | None:
    """Strict JSON has no inf or NaN: such errors are written as the strings "inf" and "nan"."""
    if value is None or math.isfinite(value):
        return value
    return str(value)


def _strict(obj: Any) -> Any:
    """The report with every non-finite float (in any nested fact) turned into text."""
    if isinstance(obj, float):
        return _finite_or_text(obj)
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


@dataclass(slots=True)
class ReportRow:
    """One test as the report states it."""

    nodeid: str  # file::name[params], relative to the suite
    group: str
    outcome: str
    duration_s: float = 0.0
    tolerance: dict[str, Any] | None = None
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    checks: int = 0
    reason: str | None = None  # skip reason, or the first line of the failure
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "nodeid": self.nodeid,
            "group": self.group,
            "outcome": self.outcome,
            "duration_s": round(self.duration_s, 4),
            "tolerance": self.tolerance,
            "max_abs_err": _finite_or_text(self.max_abs_err),
            "max_rel_err": _finite_or_text(self.max_rel_err),
            "checks": self.checks,
            "reason": self.reason,
            "details": self.details,
        }


@dataclass(slots=True)
class RunReport:
    """Everything one run verified, on what, and how it ended."""

    environment: dict[str, Any]
    run: dict[str, Any]
    tests: list[ReportRow]
    declared_deviations: list[dict[str, Any]]
    unused_exclusions: list[dict[str, Any]]
    tolerances: dict[str, Any]
    checks_described: dict[str, str]  # test function -> what it verifies (its docstring)
    problems: list[str] = field(default_factory=list)  # run-level failures (no tests, manifest, ...)

    def counts(self) -> Counter[str]:
        return Counter(t.outcome for t in self.tests)

    @property
    def passed(self) -> bool:
        c = self.counts()
        return not self.problems and not any(c[o] for o in FAILING_OUTCOMES) and c[PASSED] > 0

    def verdict_line(self) -> str:
        c = self.counts()
        plugin = self.environment.get("plugin", {})
        name = plugin.get("entry_point", "?")
        dist = f"{plugin.get('distribution', '?')} {plugin.get('version', '?')}"
        n_dev = len(self.declared_deviations)
        scope = []
        if self.run.get("quick"):
            scope.append("quick grid")
        if self.run.get("keyword"):
            scope.append(f"-k {self.run['keyword']!r}")
        if self.run.get("dtype_restricted"):
            scope.append("dtypes " + ", ".join(self.run["dtypes"]))
        words = [
            f"{c[PASSED]} passed",
            f"{c[FAILED] + c[ERROR]} failed",
            f"{c[DECLARED_SKIP]} skipped as declared",
        ]
        if c[STATED_SKIP]:
            words.append(f"{c[STATED_SKIP]} skipped for a stated reason")
        words += [f"{n_dev} declared deviations", f"{c[UNDECLARED_SKIP]} undeclared skips"]
        line = f"{'PASS' if self.passed else 'FAIL'}: {name} ({dist}) — " + ", ".join(words)
        if scope:
            line += f" [{'; '.join(scope)}]"
        if self.problems:
            line += " — " + "; ".join(self.problems)
        return line

    def as_dict(self) -> dict[str, Any]:
        c = self.counts()
        groups: dict[str, Counter[str]] = {}
        for t in self.tests:
            groups.setdefault(t.group, Counter())[t.outcome] += 1
        return {
            "schema": REPORT_SCHEMA,
            "verdict": "PASS" if self.passed else "FAIL",
            "verdict_line": self.verdict_line(),
            **self.environment,
            "run": self.run,
            "summary": {
                "total": len(self.tests),
                "passed": c[PASSED],
                "failed": c[FAILED],
                "errors": c[ERROR],
                "skipped_declared": c[DECLARED_SKIP],
                "skipped_stated": c[STATED_SKIP],
                "undeclared_skips": c[UNDECLARED_SKIP],
                "problems": self.problems,
            },
            "groups": {g: dict(v) for g, v in sorted(groups.items())},
            "tolerances": self.tolerances,
            "declared_deviations": self.declared_deviations,
            "unused_exclusions": self.unused_exclusions,
            "checks": self.checks_described,
            "tests": [t.as_dict() for t in self.tests],
        }

    def write(self, json_path: Path | str) -> tuple[Path, Path]:
        """Write the JSON report and its Markdown twin (same name, .md)."""
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(_strict(self.as_dict()), indent=2, default=str, allow_nan=False) + "\n",
                             encoding="utf-8")
        md_path = json_path.with_suffix(".md")
        md_path.write_text(render_markdown(self.as_dict()), encoding="utf-8")
        return json_path, md_path


def _fmt_err(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.2e}" if isinstance(value, float) else str(value)


def _fmt_tol(tol: dict[str, Any] | None) -> str:
    if not tol:
        return "-"
    mark = " (declared)" if tol.get("declared") else ""
    return f"{tol['dtype']} {tol['group']}: atol {tol['atol']:g}, rtol {tol['rtol']:g}{mark}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(r: dict[str, Any]) -> str:
    """A human-readable report with the same content as the JSON."""
    p, plugin, dev, ver, run, s = r["platform"], r["plugin"], r["device"], r["versions"], r["run"], r["summary"]
    out = [f"# pagedllm conformance report: {plugin['entry_point']}", "", f"**{r['verdict_line']}**", ""]
    out += ["## What was tested", "", "| | |", "|---|---|"]
    rows = [
        ("platform", f"{p['name']} (`{p['class']}`)"),
        ("plugin", f"{plugin['distribution']} {plugin['version']} (entry point `{plugin['entry_point']}`, "
                   f"module `{plugin['module']}`, plugin API {plugin['api_version']})"),
        ("verified on", p["verified_on"]),
        ("selected", p["selected_because"]),
        ("device", f"{dev.get('name')} × {dev.get('count')} ({p['device_type']}, {p['dist_backend']})"),
        ("device memory", f"{dev.get('total_memory_bytes')} bytes total, {dev.get('free_memory_bytes')} free"),
        ("device facts", json.dumps(dev.get("describe"), default=str)),
        ("dtypes", ", ".join(p["supported_dtypes"])),
        ("manifest", plugin["manifest"]),
        ("versions", ", ".join(f"{k} {v}" for k, v in ver.items())),
        ("host", f"{r['host']['os']} ({r['host']['machine']})"),
        ("grid", "quick" if run.get("quick") else "full"),
        ("selection", f"-k {run['keyword']!r}" if run.get("keyword") else "all tests"),
        ("dtypes exercised", ", ".join(run.get("dtypes", []))),
        ("command", f"`{run.get('command')}`"),
        ("started", run.get("started")),
        ("runtime", f"{run.get('duration_s', 0):.1f} s"),
    ]
    out += [f"| {k} | {_cell(v)} |" for k, v in rows]
    out += ["", "## Summary", "", "| group | " + " | ".join(
        ["passed", "failed", "error", "declared skip", "stated skip", "undeclared skip"]) + " |",
        "|---|---|---|---|---|---|---|"]
    for g, counts in r["groups"].items():
        vals = [counts.get(o, 0) for o in (PASSED, FAILED, ERROR, DECLARED_SKIP, STATED_SKIP, UNDECLARED_SKIP)]
        out.append(f"| {g} | " + " | ".join(map(str, vals)) + " |")
    out.append(
        f"| **total** | {s['passed']} | {s['failed']} | {s['errors']} | {s['skipped_declared']} | "
        f"{s['skipped_stated']} | {s['undeclared_skips']} |"
    )
    if s["problems"]:
        out += ["", "Run-level problems:", ""] + [f"- {x}" for x in s["problems"]]
    out += ["", "## Declared deviations", ""]
    if r["declared_deviations"]:
        for d in r["declared_deviations"]:
            if d["kind"] == "exclusion":
                out.append(f"- exclusion `{d['test']}`: {d['reason']} — skipped {len(d['matched'])} test(s)")
            else:
                out.append(
                    f"- tolerance {d['dtype']} {d['group']}: atol {d['atol']:g}, rtol {d['rtol']:g} "
                    f"(suite default atol {d['default_atol']:g}, rtol {d['default_rtol']:g})"
                )
    else:
        out.append("None: every check ran with the suite's default tolerances and nothing was excluded.")
    if r["unused_exclusions"]:
        out += ["", "Exclusions that matched no test in this run:", ""]
        out += [f"- `{d['test']}`: {d['reason']}" for d in r["unused_exclusions"]]
    out += ["", "## Tolerances used", "", "| dtype | group | atol | rtol | source |", "|---|---|---|---|---|"]
    for dtype, groups in r["tolerances"].items():
        for g, t in groups.items():
            out.append(f"| {dtype} | {g} | {t['atol']:g} | {t['rtol']:g} | "
                       f"{'declared' if t['declared'] else 'default'} |")
    failures = [t for t in r["tests"] if t["outcome"] in FAILING_OUTCOMES]
    if failures:
        out += ["", "## Failures", ""]
        for t in failures:
            out.append(f"- **{t['outcome']}** `{t['nodeid']}`: {_cell(t['reason'])}")
    if run.get("attention_scenarios"):
        out += ["", "## Attention scenarios (the first part of each attention test id)", ""]
        out += [f"- `{name}`: {desc}" for name, desc in run["attention_scenarios"].items()]
        out += ["", "Shape part of the id: `bs` block size, `hs` head size, `mha`/`gqaN`/`mqa` with `hHkvK` query and "
                "KV heads; then the dtype. The JSON report holds each case's steps, block tables and cache fill."]
    out += ["", "## What each test checks", ""]
    out += [f"- `{name}`: {doc}" for name, doc in r["checks"].items()]
    out += ["", "## Tests", "", "| test | outcome | tolerance | worst abs err | worst rel err | checks | time (s) |",
            "|---|---|---|---|---|---|---|"]
    for t in r["tests"]:
        outcome = t["outcome"] + (f": {_cell(t['reason'])}" if t["reason"] and "skip" in t["outcome"] else "")
        out.append(
            f"| `{t['nodeid']}` | {outcome} | {_fmt_tol(t['tolerance'])} | {_fmt_err(t['max_abs_err'])} | "
            f"{_fmt_err(t['max_rel_err'])} | {t['checks']} | {t['duration_s']:.3f} |"
        )
    return "\n".join(out) + "\n"
