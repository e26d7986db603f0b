"""IPEX fast-path selection: lazy detection, version matching, the env switch, and the layout guard."""

from __future__ import annotations

import sys

import pytest
import torch
from pagedllm.plugin import AttentionSpec
from pagedllm_cpu.kernels import ipex as ipex_kernels
from pagedllm_cpu.platform import CpuPlatform

USABLE = ipex_kernels.ipex_status().usable


def test_not_installed_is_reported_as_such() -> None:
    status = ipex_kernels.judge(installed=False, ipex_version=None, torch_version="2.13.0+cpu")
    assert not status.usable and "not installed" in status.reason


def test_version_mismatch_names_both_versions() -> None:
    status = ipex_kernels.judge(installed=True, ipex_version="2.8.0+cpu", torch_version="2.13.0+cpu")
    assert not status.usable
    assert "2.8.0+cpu" in status.reason and "torch 2.8.*" in status.reason and "2.13.0+cpu" in status.reason


def test_matching_major_minor_is_usable() -> None:
    assert ipex_kernels.judge(installed=True, ipex_version="2.8.0+cpu", torch_version="2.8.1+cu128").usable


@pytest.mark.parametrize("mode", ["0", "off"])
def test_env_can_disable_ipex(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setenv(ipex_kernels.IPEX_ENV, mode)
    monkeypatch.setattr(ipex_kernels, "ipex_status", lambda: ipex_kernels.IpexStatus(True, "2.8.0", "ok"))
    assert ipex_kernels.ipex_wanted() is False
    backend = CpuPlatform().attention_backend(AttentionSpec(4, 2, 64, 0.125, torch.float32, 16))
    assert backend.name == "cpu-torch" and backend.ipex is None


def test_forcing_ipex_when_unusable_fails_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ipex_kernels.IPEX_ENV, "1")
    missing = ipex_kernels.judge(installed=False, ipex_version=None, torch_version="2.13.0")
    monkeypatch.setattr(ipex_kernels, "ipex_status", lambda: missing)
    with pytest.raises(RuntimeError, match="not installed"):
        ipex_kernels.ipex_wanted()


def test_bad_env_value_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ipex_kernels.IPEX_ENV, "maybe")
    with pytest.raises(ValueError, match=ipex_kernels.IPEX_ENV):
        ipex_kernels.ipex_wanted()


def test_detection_and_a_disabled_platform_never_import_ipex(monkeypatch: pytest.MonkeyPatch) -> None:
    if "intel_extension_for_pytorch" in sys.modules:
        pytest.skip("IPEX was already imported by an earlier test in this process")
    monkeypatch.setenv(ipex_kernels.IPEX_ENV, "0")
    ipex_kernels.ipex_status()
    p = CpuPlatform()
    p.describe()
    p.attention_backend(AttentionSpec(4, 2, 64, 0.125, torch.float32, 16))
    assert "intel_extension_for_pytorch" not in sys.modules


@pytest.mark.skipif(not USABLE, reason="intel_extension_for_pytorch matching this torch is not installed")
def test_usable_ipex_is_selected_and_described(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ipex_kernels.IPEX_ENV, "1")
    p = CpuPlatform()
    backend = p.attention_backend(AttentionSpec(4, 2, 64, 0.125, torch.bfloat16, 16))
    assert backend.name == "cpu-ipex"
    assert p.describe()["ipex"].startswith("used:")


@pytest.mark.skipif(not USABLE, reason="intel_extension_for_pytorch matching this torch is not installed")
def test_fp32_attention_stays_on_the_c_kernels_and_decodes_are_still_captured(monkeypatch, tmp_path) -> None:
    # IPEX on used to switch the C attention and decode capture off for fp32, the slower choice.
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.model.testing import make_tiny_model
    from pagedllm.sample.sampling_params import SamplingParams
    from pagedllm_cpu.kernels import clib

    if clib.status()[0] is None:
        pytest.skip(f"C kernels unavailable: {clib.status()[1]}")
    monkeypatch.setenv(ipex_kernels.IPEX_ENV, "1")
    p = CpuPlatform()
    fp32 = p.attention_backend(AttentionSpec(4, 2, 64, 0.125, torch.float32, 16))
    assert fp32.ipex is None and fp32.kernels is not None
    assert p.describe()["attention"].startswith("cpu-c")
    llm = LLM(make_tiny_model("llama", tmp_path / "llama"), dtype="float32", max_num_seqs=2, max_model_len=64)
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert sorted(llm.llm_engine.engine_core.executor.runner.decode_graphs.captured) == [1]


@pytest.mark.skipif(not USABLE, reason="intel_extension_for_pytorch matching this torch is not installed")
def test_wrong_cache_layout_raises_instead_of_crashing_in_ipex() -> None:
    kernels = ipex_kernels.load()
    wrong = torch.zeros(2, 4, 16, 2, 64)  # [2, nb, bs, H, D]: the reference layout
    with pytest.raises(ValueError, match="IPEX needs"):
        kernels.write_kv(torch.zeros(1, 2, 64), torch.zeros(1, 2, 64), wrong, torch.tensor([0]))


@pytest.mark.skipif(not USABLE, reason="intel_extension_for_pytorch matching this torch is not installed")
@pytest.mark.parametrize("window,cap", [(1, None), (4, 2.0)])
def test_shapes_ipex_cannot_do_exactly_use_the_torch_kernels(window: int, cap: float | None) -> None:
    kernels = ipex_kernels.load()
    assert not kernels.supports(AttentionSpec(4, 2, 64, 0.125, torch.float32, 16, window, cap))
