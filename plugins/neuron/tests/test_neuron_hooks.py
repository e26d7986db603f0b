"""pagedllm-neuron detection: cheap (no torch_neuronx/torch_xla import), specific reasons, the twin switch."""

from __future__ import annotations

import importlib.util

import pytest

from pagedllm.kernels.xla_twin import ENV_VAR
from pagedllm_neuron import hooks


def fake_devices(monkeypatch: pytest.MonkeyPatch, paths: list[str]) -> None:
    monkeypatch.setattr(hooks.glob, "glob", lambda pattern: paths if pattern.startswith("/dev/neuron") else [])


def test_no_device_is_the_reason_and_the_twin_switch_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    fake_devices(monkeypatch, [])
    candidate = hooks.pagedllm_platform()
    assert not candidate.available and "no Neuron device (/dev/neuron*) found" in candidate.reason
    assert ENV_VAR in candidate.reason and len(candidate.reason) <= 160


def test_device_without_runtime_library_says_libnrt_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    fake_devices(monkeypatch, ["/dev/neuron0"])
    monkeypatch.setattr(hooks, "neuron_runtime_present", lambda: False)
    assert "Neuron runtime library (libnrt) is missing" in hooks.pagedllm_platform().reason


def test_hidden_cores_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    fake_devices(monkeypatch, ["/dev/neuron0"])
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "")
    assert "NEURON_RT_VISIBLE_CORES is empty" in hooks.pagedllm_platform().reason


def test_device_runtime_without_torch_neuronx_names_aws_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    fake_devices(monkeypatch, ["/dev/neuron0", "/dev/neuron1"])
    monkeypatch.setattr(hooks, "neuron_runtime_present", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(hooks.importlib.util, "find_spec", lambda n: None if n == "torch_neuronx" else real(n))
    assert "2 Neuron device(s) found but torch_neuronx is not installed" in hooks.pagedllm_platform().reason


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="needs torch-xla")
def test_twin_switch_offers_a_platform_that_never_outranks_the_cpu_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "1")
    candidate = hooks.pagedllm_platform()
    assert candidate.available and candidate.platform_class == "pagedllm_neuron.platform:NeuronXlaCpuPlatform"
    assert candidate.priority < 10
