"""Ascend detection: specific reasons from device nodes, driver, ASCEND_RT_VISIBLE_DEVICES and CANN, never importing torch_npu."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pagedllm_ascend import hooks


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A fake /dev, driver folder and CANN lib64 the detection functions read (files only, nothing loaded)."""
    dev, driver, lib64 = tmp_path / "dev", tmp_path / "driver", tmp_path / "cann" / "lib64"
    dev.mkdir()
    scan = hooks.npu_device_nodes
    monkeypatch.setattr(hooks, "npu_device_nodes", lambda: scan(str(dev)))
    monkeypatch.setattr(hooks, "DRIVER_DIRS", (str(driver),))
    monkeypatch.setattr(hooks, "cann_library_dirs", lambda: [str(lib64)])
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("PAGEDLLM_ASCEND_ATTENTION", raising=False)
    monkeypatch.delenv("PAGEDLLM_TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(hooks, "torch_npu_version", lambda: None)
    return dev, driver, lib64


def add_npus(dev: Path, count: int) -> None:
    for name in ["davinci_manager", "davinci_manager_docker", *(f"davinci{i}" for i in range(count))]:
        (dev / name).touch()


def test_no_device_nodes_and_no_driver_is_named(machine) -> None:
    usable, reason = hooks.detect()
    assert not usable and "no /dev/davinci<N>" in reason and "no Ascend driver" in reason


def test_device_nodes_are_counted_without_control_nodes(machine) -> None:
    dev, _, _ = machine
    add_npus(dev, 2)
    assert [Path(n).name for n in hooks.npu_device_nodes()] == ["davinci0", "davinci1"]


def test_devices_without_driver_install(machine) -> None:
    add_npus(machine[0], 1)
    usable, reason = hooks.detect()
    assert not usable and "no Ascend driver install" in reason


@pytest.mark.parametrize(("value", "expected"), [("", "hides every NPU"), ("-1", "hides every NPU"),
                                                  ("0,5", "names NPU(s) 5 with no /dev/davinci node")])
def test_visible_devices_hiding_or_naming_absent_npus(machine, monkeypatch, value, expected) -> None:
    dev, driver, _ = machine
    add_npus(dev, 2)
    driver.mkdir()
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", value)
    usable, reason = hooks.detect()
    assert not usable and expected in reason


def test_missing_cann_libraries_are_listed(machine) -> None:
    dev, driver, lib64 = machine
    add_npus(dev, 8)
    driver.mkdir()
    lib64.mkdir(parents=True)
    (lib64 / "libascendcl.so").touch()
    usable, reason = hooks.detect()
    assert not usable and "8 Ascend NPU(s)" in reason and "libhccl.so not found" in reason and "set_env.sh" in reason


def test_torch_npu_missing_then_ready(machine, monkeypatch) -> None:
    dev, driver, lib64 = machine
    add_npus(dev, 2)
    driver.mkdir()
    lib64.mkdir(parents=True)
    for lib in hooks.CANN_LIBRARIES:
        (lib64 / lib).touch()
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "1")
    usable, reason = hooks.detect()
    assert not usable and "torch_npu is not installed" in reason
    monkeypatch.setattr(hooks, "torch_npu_version", lambda: "2.13.0")
    usable, reason = hooks.detect()
    assert usable and reason.startswith("1 Ascend NPU(s)") and "torch_npu 2.13.0" in reason and "attention: fused" in reason
    candidate = hooks.pagedllm_platform()
    assert candidate.platform_class == "pagedllm_ascend.platform:AscendPlatform" and candidate.priority == 100
    monkeypatch.setattr(hooks, "triton_ascend_version", lambda: None)
    monkeypatch.setenv("PAGEDLLM_ASCEND_ATTENTION", "triton")
    assert "needs triton-ascend" in hooks.detect()[1]
    monkeypatch.setenv("PAGEDLLM_ASCEND_ATTENTION", "cuda")
    assert "is not one of fused, triton" in hooks.pagedllm_platform().reason


def test_interpreter_twin_needs_triton_ascend_and_is_never_chosen_by_priority(machine, monkeypatch) -> None:
    monkeypatch.setenv("PAGEDLLM_TRITON_INTERPRET", "1")
    monkeypatch.setattr(hooks, "triton_ascend_version", lambda: None)
    assert "triton-ascend is not installed" in hooks.pagedllm_platform().reason
    monkeypatch.setattr(hooks, "triton_ascend_version", lambda: "3.2.0")
    candidate = hooks.pagedllm_platform()
    assert candidate.available and candidate.priority == 0 and "triton-ascend 3.2.0 interpreter on CPU" in candidate.reason
    monkeypatch.setenv("PAGEDLLM_ASCEND_ATTENTION", "fused")
    assert not hooks.pagedllm_platform().available


def test_detection_and_pagedllm_env_never_import_torch_npu(tmp_path) -> None:
    """A torch_npu that fails to import as it does without CANN: detection and `pagedllm env` must not touch it."""
    fake = tmp_path / "site"
    (fake / "torch_npu").mkdir(parents=True)
    (fake / "torch_npu" / "__init__.py").write_text(
        "raise ImportError('libhccl.so: cannot open shared object file (test double of torch_npu without CANN)')\n")
    code = textwrap.dedent("""
        import sys
        from pagedllm_ascend import hooks
        candidate = hooks.pagedllm_platform()
        from pagedllm.entrypoints.cli import main
        try:
            main(["env"])
        except SystemExit as exc:
            assert not exc.code, exc.code
        assert "torch_npu" not in sys.modules, "torch_npu was imported"
        print("REASON", candidate.reason)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PAGEDLLM_TRITON_INTERPRET", "PAGEDLLM_PLATFORM")}
    env["PYTHONPATH"] = os.pathsep.join([str(fake), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REASON " in result.stdout and "ascend" in result.stdout


def test_plugin_does_not_depend_on_torch_npu() -> None:
    """Installing pagedllm-ascend must never bring torch_npu (which breaks `import torch` without CANN)."""
    from importlib.metadata import requires

    hard = [r for r in requires("pagedllm-ascend") or [] if "extra ==" not in r]
    assert not any("torch-npu" in r.lower().replace("_", "-") for r in hard), hard
