"""pagedllm-cuda detection: cheap, honest about why CUDA is unusable, and the interpreter switch."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from pagedllm.kernels.interpret import ENV_VAR
from pagedllm_cuda import hooks

no_cuda_build = pytest.mark.skipif(torch.version.cuda is not None, reason="torch here is built with CUDA")


@no_cuda_build
def test_detection_says_torch_has_no_cuda(monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    candidate = hooks.pagedllm_platform()
    assert not candidate.available
    assert f"torch {torch.__version__} built without CUDA" in candidate.reason
    assert ENV_VAR in candidate.reason  # tells the user how to run the kernels anyway
    assert len(candidate.reason) <= 160  # `pagedllm env` shows 160 characters


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the triton extra is not installed")
def test_interpreter_switch_offers_a_cpu_platform_that_never_outranks_the_cpu_plugin(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, "1")
    candidate = hooks.pagedllm_platform()
    assert candidate.available and candidate.platform_class == "pagedllm_cuda.platform:CudaInterpreterPlatform"
    assert candidate.priority < 10 and "Triton interpreter on CPU" in candidate.reason


def test_detection_does_not_import_triton_or_initialise_cuda() -> None:
    code = (
        "import sys, torch; from pagedllm_cuda.hooks import pagedllm_platform; pagedllm_platform();"
        "assert 'triton' not in sys.modules, 'triton imported'; assert not torch.cuda.is_initialized()"
    )
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@no_cuda_build
def test_pagedllm_env_explains_cuda_is_unavailable() -> None:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "PAGEDLLM_PLATFORM")}
    out = subprocess.run(
        [sys.executable, "-m", "pagedllm.entrypoints.cli", "env"], env=env, capture_output=True, text=True, timeout=120
    ).stdout
    row = next(line for line in out.splitlines() if line.startswith("cuda "))
    assert " no " in row and "built without CUDA" in row


def test_interpreter_switch_without_triton_declines_and_names_the_extra(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, "1")
    monkeypatch.setattr(hooks.importlib.util, "find_spec", lambda name: None)
    candidate = hooks.pagedllm_platform()
    assert not candidate.available and "pagedllm[triton]" in candidate.reason


def test_core_and_detection_work_without_triton_installed() -> None:
    # sys.modules[name] = None makes `import triton` fail as if it were not installed.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import pagedllm, pagedllm.plugin, pagedllm.kernels, pagedllm.kernels.interpret\n"
        "from pagedllm_cuda.hooks import pagedllm_platform as cuda\n"
        "from pagedllm_rocm.hooks import pagedllm_platform as rocm\n"
        "assert not cuda().available and not rocm().available  # no backend without its kernels\n"
        "try:\n    import pagedllm.kernels.triton\nexcept ImportError as e:\n    assert 'pagedllm[triton]' in str(e)\n"
        "else:\n    raise AssertionError('pagedllm.kernels.triton imported without triton')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
