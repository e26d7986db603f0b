"""pagedllm-tpu detection: cheap (no torch_xla import), a specific reason, and the XLA:CPU twin switch."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from pagedllm.kernels.xla_twin import ENV_VAR
from pagedllm_tpu import hooks

no_torch_xla = pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch-xla is installed here")


def fake_devices(monkeypatch: pytest.MonkeyPatch, paths: list[str]) -> None:
    monkeypatch.setattr(hooks.glob, "glob", lambda pattern: [p for p in paths if p.startswith(pattern.split("*")[0].split("[")[0])])


def test_no_chip_is_the_reason_and_the_twin_switch_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    fake_devices(monkeypatch, [])
    candidate = hooks.pagedllm_platform()
    assert not candidate.available
    assert "no TPU chip (/dev/accel* or /dev/vfio/N) found" in candidate.reason
    assert ENV_VAR in candidate.reason and len(candidate.reason) <= 160


def test_chip_without_libtpu_says_libtpu_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    fake_devices(monkeypatch, ["/dev/accel0", "/dev/accel1"])
    monkeypatch.setattr(hooks, "libtpu_present", lambda: False)
    candidate = hooks.pagedllm_platform()
    assert not candidate.available and "2 TPU chip(s) found but libtpu is not installed" in candidate.reason


def test_hidden_chips_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    fake_devices(monkeypatch, ["/dev/accel0"])
    monkeypatch.setenv("TPU_VISIBLE_CHIPS", "")
    assert "TPU_VISIBLE_CHIPS is empty" in hooks.pagedllm_platform().reason


def test_chip_libtpu_and_torch_xla_make_the_tpu_platform_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    fake_devices(monkeypatch, ["/dev/vfio/0"])
    monkeypatch.setattr(hooks, "libtpu_present", lambda: True)
    monkeypatch.setattr(hooks.importlib.util, "find_spec", lambda name: object())
    candidate = hooks.pagedllm_platform()
    assert candidate.available and candidate.platform_class == "pagedllm_tpu.platform:TpuPlatform"
    assert candidate.priority > 10


@no_torch_xla
def test_twin_switch_without_torch_xla_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "1")
    candidate = hooks.pagedllm_platform()
    assert not candidate.available and "torch_xla is not installed" in candidate.reason


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="needs torch-xla")
def test_twin_switch_offers_a_platform_that_never_outranks_the_cpu_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "1")
    candidate = hooks.pagedllm_platform()
    assert candidate.available and candidate.platform_class == "pagedllm_tpu.platform:TpuXlaCpuPlatform"
    assert candidate.priority < 10 and "XLA:CPU twin" in candidate.reason


def test_env_lists_tpu_and_neuron_with_reasons_and_imports_no_xla_module() -> None:
    code = (
        "import sys; from pagedllm.entrypoints.cli import main; rc = main(['env']);"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch_xla', 'jax', 'torch_neuronx')];"
        "assert not bad, bad; sys.exit(rc)"
    )
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "PAGEDLLM_PLATFORM")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    assert "no TPU chip" in lines["tpu"], out.stdout
    assert "no Neuron device" in lines["neuron"], out.stdout
