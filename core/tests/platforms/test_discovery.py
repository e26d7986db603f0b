"""Discovery and selection with real installed plugin distributions (no patched metadata)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pagedllm.plugin_version import PLUGIN_API_VERSION

from external_plugin import build_wheel, pip_install

PROBE = """
import json, sys
from pagedllm.platforms.discovery import discover_plugins, select_platform
from pagedllm.errors import PlatformError
plugins = discover_plugins()
out = {"plugins": {p.name: {"available": p.available, "reason": p.reason, "error": p.error} for p in plugins}}
try:
    sel = select_platform(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None, plugins=plugins)
    out["selected"] = sel.plugin.name
    out["why"] = sel.why
    out["device"] = sel.platform.device_name()
except PlatformError as exc:
    out["error"] = exc.message
print(json.dumps(out))
"""


def probe(site: Path | None, requested: str = "", env_platform: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop("PAGEDLLM_PLATFORM", None)
    if env_platform is not None:
        env["PAGEDLLM_PLATFORM"] = env_platform
    if site is not None:
        env["PYTHONPATH"] = f"{site}{os.pathsep}{env.get('PYTHONPATH', '')}"
    res = subprocess.run(
        [sys.executable, "-c", PROBE, requested], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pip-installed site dir holding several out-of-tree plugins."""
    build = tmp_path_factory.mktemp("wheels")
    target = tmp_path_factory.mktemp("site")
    wheels = [
        build_wheel(build, "extgood", priority=50),
        build_wheel(build, "extold", api_version=(2, 0), priority=60),
        build_wheel(build, "extboom", detect_body="raise RuntimeError('probe exploded')"),
    ]
    pip_install(wheels, target)
    return target


def test_all_six_in_tree_plugins_are_listed_and_cpu_selected_by_default() -> None:
    out = probe(None)
    assert {"cpu", "cuda", "rocm", "tpu", "neuron", "ascend"} <= set(out["plugins"])
    assert out["selected"] == "cpu"
    for name in ("cuda", "rocm", "tpu", "neuron", "ascend"):
        info = out["plugins"][name]
        assert not info["available"] and info["reason"], f"{name} must say why it declined"


def test_external_plugin_is_discovered_and_wins_by_priority(site: Path) -> None:
    out = probe(site)
    assert out["plugins"]["extgood"]["available"]
    assert out["selected"] == "extgood"
    assert "highest priority" in out["why"]
    assert out["device"] == "external-test-device"


def test_external_plugin_of_other_major_api_version_is_refused_naming_both(site: Path) -> None:
    out = probe(site)
    info = out["plugins"]["extold"]
    assert not info["available"]
    ours = "{}.{}".format(*PLUGIN_API_VERSION)
    assert "2.0" in info["error"] and ours in info["error"]
    forced = probe(site, requested="extold")
    assert "error" in forced and "2.0" in forced["error"] and ours in forced["error"]


def test_plugin_raising_during_detection_is_reported_not_skipped(site: Path) -> None:
    out = probe(site)
    assert "probe exploded" in out["plugins"]["extboom"]["error"]


def test_platform_option_and_env_var_select_a_lower_priority_plugin(site: Path) -> None:
    assert probe(site, requested="cpu")["selected"] == "cpu"
    out = probe(site, env_platform="cpu")
    assert out["selected"] == "cpu" and "PAGEDLLM_PLATFORM" in out["why"]


def test_requesting_unavailable_platform_fails_with_reason_and_table() -> None:
    out = probe(None, env_platform="cuda")
    assert "cuda" in out["error"] and "not usable" in out["error"]
    assert "tpu" in out["error"], "the error lists every installed plugin"


def test_requesting_unknown_platform_fails_clearly() -> None:
    out = probe(None, requested="nosuch")
    assert "no such plugin" in out["error"]


def test_priority_tie_is_an_error_naming_both(tmp_path: Path) -> None:
    wheels = [build_wheel(tmp_path, "tiea", priority=70), build_wheel(tmp_path, "tieb", priority=70)]
    target = tmp_path / "site"
    pip_install(wheels, target)
    out = probe(target)
    assert "tiea" in out["error"] and "tieb" in out["error"] and "--platform" in out["error"]


def test_pagedllm_env_cli_lists_plugins_and_explains_choice(site: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("PAGEDLLM_PLATFORM", None)
    res = subprocess.run(
        [sys.executable, "-m", "pagedllm.entrypoints.cli", "env"], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    for name in ("cpu", "cuda", "rocm", "tpu", "neuron", "ascend", "extgood", "extold", "extboom"):
        assert name in res.stdout
    assert "selected: extgood" in res.stdout
    assert "torch" in res.stdout and "python" in res.stdout
