"""Build a temporary site of plugin distributions and run ``pagedllm-conformance`` against one of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class PlantedBug:
    name: str  # entry-point name; the Platform class must use it as its ``name``
    platform_class: str  # "module:Class", importable with conformance/tests on sys.path
    description: str
    keyword: str  # -k expression for the run
    must_fail: tuple[str, ...]  # test functions of which at least one case must fail
    register: str | None = None  # "module:function(registry)"; default: the CPU plugin's registrations
    manifest: str | None = None  # conformance.toml text shipped with the plugin


_HOOKS = '''
"""Entry point of the planted conformance plugin {name!r}: {description}."""

import importlib

from pagedllm.plugin import PlatformCandidate, hookimpl

PLUGIN_API_VERSION = (1, 0)


@hookimpl
def pagedllm_platform():
    # Priority below any real plugin: only ever selected by name.
    return PlatformCandidate({name!r}, {platform_class!r}, "planted bug: {description}", priority=-100)


@hookimpl
def pagedllm_register(registry):
    module, _, fn = {register!r}.partition(":")
    getattr(importlib.import_module(module), fn)(registry)
'''


def build_site(root: Path, bugs: list[PlantedBug]) -> Path:
    """One package + dist-info per bug under ``root``, as pip would lay them out in site-packages."""
    root.mkdir(parents=True, exist_ok=True)
    for bug in bugs:
        package = f"pagedllm_{bug.name}"
        pkg = root / package
        pkg.mkdir(exist_ok=True)
        (pkg / "__init__.py").write_text(f'"""Planted conformance plugin: {bug.description}."""\n')
        register = bug.register or "conformance_planted.cpu_bugs:register_cpu_ops"
        (pkg / "hooks.py").write_text(
            _HOOKS.format(name=bug.name, platform_class=bug.platform_class, description=bug.description,
                          register=register)
        )
        if bug.manifest is not None:
            (pkg / "conformance.toml").write_text(textwrap.dedent(bug.manifest))
        dist = root / f"pagedllm_{bug.name}-0.0.1.dist-info"
        dist.mkdir(exist_ok=True)
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: pagedllm-{bug.name.replace('_', '-')}\nVersion: 0.0.1\n")
        (dist / "entry_points.txt").write_text(f"[pagedllm]\n{bug.name} = {package}.hooks\n")
        (dist / "top_level.txt").write_text(f"{package}\n")
    return root


@dataclass(slots=True)
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    report: dict[str, Any] | None
    report_path: str

    def failed_tests(self) -> list[str]:
        if self.report is None:
            return []
        return [t["nodeid"] for t in self.report["tests"] if t["outcome"] in ("failed", "error", "undeclared skip")]

    def explain(self) -> str:
        verdict = self.report["verdict_line"] if self.report else "(no report written)"
        return f"exit {self.returncode}; {verdict}\n--- stdout tail ---\n{self.stdout[-3000:]}\n--- stderr tail ---\n{self.stderr[-3000:]}"


def start_conformance(site: Path, platform: str, args: list[str], report: Path) -> subprocess.Popen:
    """Start the real console script with the site (and the planted code) on the subprocess's path only."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(TESTS_DIR), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    script = Path(sys.executable).parent / "pagedllm-conformance"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "pagedllm_conformance"]
    return subprocess.Popen(
        [*cmd, "--platform", platform, "--report", str(report), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(site),
    )


def finish(proc: subprocess.Popen, report: Path, timeout: float = 600) -> RunResult:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    data = json.loads(report.read_text()) if report.exists() else None
    return RunResult(proc.returncode, out, err, data, str(report))


def run_conformance(site: Path, platform: str, args: list[str], report: Path, timeout: float = 600) -> RunResult:
    return finish(start_conformance(site, platform, args, report), report, timeout)
