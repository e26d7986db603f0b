"""pagedllm-rocm detection: HIP build of torch, KFD topology, honest reasons, the interpreter switch."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from pagedllm.kernels.interpret import ENV_VAR
from pagedllm_rocm import hooks

no_hip_build = pytest.mark.skipif(torch.version.hip is not None, reason="torch here is built with ROCm")


@no_hip_build
def test_detection_says_torch_has_no_rocm(monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    candidate = hooks.pagedllm_platform()
    assert not candidate.available
    assert "built without ROCm (torch.version.hip is None)" in candidate.reason
    assert ENV_VAR in candidate.reason and len(candidate.reason) <= 160


def test_kfd_topology_counts_gpu_nodes_not_cpu_nodes(tmp_path) -> None:
    for node, simd in (("0", 0), ("1", 304), ("2", 304)):  # node 0 is the host CPU
        (tmp_path / node).mkdir()
        (tmp_path / node / "properties").write_text(f"cpu_cores_count 0\nsimd_count {simd}\nmax_waves_per_simd 8\n")
    assert hooks.kfd_gpu_count(str(tmp_path)) == 2
    assert hooks.kfd_gpu_count(str(tmp_path / "missing")) == 0


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the triton extra is not installed")
def test_interpreter_switch_offers_a_cpu_platform_that_never_outranks_the_cpu_plugin(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, "1")
    candidate = hooks.pagedllm_platform()
    assert candidate.available and candidate.platform_class == "pagedllm_rocm.platform:RocmInterpreterPlatform"
    assert candidate.priority < 10


@no_hip_build
def test_pagedllm_env_explains_rocm_is_unavailable() -> None:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "PAGEDLLM_PLATFORM")}
    out = subprocess.run(
        [sys.executable, "-m", "pagedllm.entrypoints.cli", "env"], env=env, capture_output=True, text=True, timeout=120
    ).stdout
    row = next(line for line in out.splitlines() if line.startswith("rocm "))
    assert " no " in row and "built without ROCm" in row


def test_interpreter_switch_without_triton_declines_and_names_the_extra(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, "1")
    monkeypatch.setattr(hooks.importlib.util, "find_spec", lambda name: None)
    candidate = hooks.pagedllm_platform()
    assert not candidate.available and "pagedllm[triton]" in candidate.reason
