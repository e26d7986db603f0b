"""CpuPlatform: the Platform contract, KV budget and thread settings from config and environment."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from pagedllm.plugin import AttentionSpec, Communicator, ConfigError, EngineConfig, Platform
from pagedllm_cpu import hooks
from pagedllm_cpu import platform as cpu_platform
from pagedllm_cpu.attention import CpuAttentionBackend
from pagedllm_cpu.communicator import CpuCommunicator
from pagedllm_cpu.kernels import clib
from pagedllm_cpu.kernels import ipex as ipex_kernels
from pagedllm_cpu.platform import CpuPlatform, GiB


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch):
    for name in (cpu_platform.KV_SPACE_ENV, cpu_platform.THREADS_ENV):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(threads)


def test_hook_names_the_cpu_platform_class() -> None:
    candidate = hooks.pagedllm_platform()
    assert candidate.available and candidate.name == "cpu"
    module, _, cls = candidate.platform_class.partition(":")
    assert (module, cls) == ("pagedllm_cpu.platform", "CpuPlatform")
    assert issubclass(CpuPlatform, Platform)


def test_device_queries_report_host_memory() -> None:
    p = CpuPlatform()
    assert p.device_count() == 1
    assert p.device_name()
    assert p.total_memory() >= p.free_memory() > 0
    assert p.device() == torch.device("cpu")


def test_verified_on_names_the_cpu_and_kernels() -> None:
    info = cpu_platform.cpu_info()
    assert info.arch in CpuPlatform.verified_on
    assert "kernels" in CpuPlatform.verified_on or "IPEX" in CpuPlatform.verified_on


@pytest.mark.parametrize(
    "flags,expected",
    [
        ({"avx2"}, torch.float32),
        ({"avx512f", "avx512_bf16"}, torch.float32),
        ({"avx512f", "amx_bf16", "amx_tile"}, torch.float32),
    ],
)
def test_default_dtype_is_float32_with_or_without_native_bf16(
    monkeypatch: pytest.MonkeyPatch, flags, expected
) -> None:
    info = dataclasses.replace(cpu_platform.cpu_info(), flags=frozenset(flags))
    monkeypatch.setattr(cpu_platform, "cpu_info", lambda: info)
    assert CpuPlatform().default_dtype() == expected


def test_check_and_update_config_resolves_dtype_and_is_idempotent(clean_env) -> None:
    p = CpuPlatform()
    config = EngineConfig()
    config.device.enforce_eager = True
    p.check_and_update_config(config)
    first = repr(config)
    assert config.model.dtype == p.default_dtype()
    assert config.device.enforce_eager is True
    p.check_and_update_config(config)
    assert repr(config) == first


def test_unsupported_dtype_is_a_clear_error(clean_env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CpuPlatform, "supported_dtypes", (torch.float32,))
    config = EngineConfig()
    config.model.dtype = "bfloat16"
    with pytest.raises(ValueError, match="not supported on cpu"):
        CpuPlatform().check_and_update_config(config)


def test_threads_from_env_are_applied(clean_env) -> None:
    clean_env.setenv(cpu_platform.THREADS_ENV, "1")
    CpuPlatform().check_and_update_config(EngineConfig())
    assert torch.get_num_threads() == 1


def test_default_threads_are_physical_cores_shared_by_tp_ranks(clean_env) -> None:
    cores = cpu_platform.cpu_info().physical_cores
    assert cpu_platform.threads_from_env() == cores
    assert cpu_platform.threads_from_env(tp_size=cores * 2) == 1


def test_set_device_applies_the_configured_threads(clean_env) -> None:
    clean_env.setenv(cpu_platform.THREADS_ENV, "1")
    p = CpuPlatform()
    p.check_and_update_config(EngineConfig())
    torch.set_num_threads(2)
    p.set_device(0)
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("raw", ["two", "0", "-3", "1.5"])
def test_bad_thread_count_is_a_clear_error(clean_env, raw: str) -> None:
    clean_env.setenv(cpu_platform.THREADS_ENV, raw)
    with pytest.raises(ValueError, match=cpu_platform.THREADS_ENV):
        CpuPlatform().check_and_update_config(EngineConfig())


def test_kv_budget_prefers_config_over_env(clean_env) -> None:
    clean_env.setenv(cpu_platform.KV_SPACE_ENV, "2")
    config = EngineConfig()
    config.cache.kv_cache_memory = 12345
    assert CpuPlatform().kv_cache_budget(config) == 12345


@pytest.mark.parametrize("raw,expected", [("2", 2 * GiB), ("0.5", GiB // 2), (" 1 ", GiB)])
def test_kv_budget_from_env_in_gib(clean_env, raw: str, expected: int) -> None:
    clean_env.setenv(cpu_platform.KV_SPACE_ENV, raw)
    assert CpuPlatform().kv_cache_budget(EngineConfig()) == expected


@pytest.mark.parametrize("raw", ["lots", "0", "-1", "nan", "inf"])
def test_bad_kv_space_env_is_a_clear_error_at_config_time(clean_env, raw: str) -> None:
    clean_env.setenv(cpu_platform.KV_SPACE_ENV, raw)
    with pytest.raises(ValueError, match=cpu_platform.KV_SPACE_ENV):
        CpuPlatform().check_and_update_config(EngineConfig())
    with pytest.raises(ValueError, match=cpu_platform.KV_SPACE_ENV):
        CpuPlatform().kv_cache_budget(EngineConfig())


def test_default_kv_budget_is_4_gib_capped_at_half_free_memory(clean_env) -> None:
    p = CpuPlatform()
    clean_env.setattr(p, "free_memory", lambda index=0: 100 * GiB)
    assert p.kv_cache_budget(EngineConfig()) == 4 * GiB
    clean_env.setattr(p, "free_memory", lambda index=0: 3 * GiB)
    assert p.kv_cache_budget(EngineConfig()) == 3 * GiB // 2


def test_attention_backend_and_communicator_are_the_cpu_ones() -> None:
    p = CpuPlatform()
    backend = p.attention_backend(AttentionSpec(4, 2, 64, 0.125, torch.float32, 16))
    assert isinstance(backend, CpuAttentionBackend)
    assert backend.kv_cache_shape(10, 16, 2, 64) == (2, 10, 2, 16, 64)
    comm = p.communicator()
    assert isinstance(comm, CpuCommunicator) and isinstance(comm, Communicator)
    assert comm.world_size == 1


def test_describe_says_whether_ipex_is_used_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = ipex_kernels.judge(installed=False, ipex_version=None, torch_version="2.13.0")
    monkeypatch.setattr(ipex_kernels, "ipex_status", lambda: missing)
    facts = CpuPlatform().describe()
    assert facts["ipex"] == "not used: intel_extension_for_pytorch is not installed"
    assert facts["attention"].startswith("cpu-c" if clib.status()[0] is not None else "cpu-torch")
    assert {"cpu", "cores", "native bf16", "kv cache", "c kernels"} <= facts.keys()


def test_describe_says_whether_the_c_kernels_are_used_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(clib.KERNELS_ENV, "0")
    clib.reset()
    try:
        facts = CpuPlatform().describe()
        assert facts["c kernels"] == f"not used: disabled by {clib.KERNELS_ENV}=0"
        if ipex_kernels.ipex_wanted():  # tox -e cpu-ipex: IPEX takes the attention the C kernels left
            assert facts["attention"].startswith("cpu-ipex")
            assert "IPEX" in cpu_platform._verified_on()
        else:
            assert facts["attention"].startswith("cpu-torch")
            assert "torch-native kernels" in cpu_platform._verified_on()
    finally:
        monkeypatch.delenv(clib.KERNELS_ENV)
        clib.reset()
    described = CpuPlatform().describe()["c kernels"]
    kernels, _ = clib.status()
    assert kernels is not None and kernels.isa in ("AVX-512", "AVX2", "portable")
    assert described.startswith(f"used ({kernels.isa} build) for fp32 matmuls")
    assert "GGUF Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K matmuls and embeddings on the blocks" in described
    if kernels.gguf_max_rows:
        assert f"up to {kernels.gguf_max_rows} token" in described
    else:
        assert "beside a dense weight the dense one is used" in described


def test_required_or_misspelt_c_kernel_setting_fails_at_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    config = EngineConfig()
    monkeypatch.setenv(clib.KERNELS_ENV, "yes")
    clib.reset()
    try:
        with pytest.raises(ConfigError, match=f"{clib.KERNELS_ENV}='yes': expected auto, 0 or 1"):
            CpuPlatform().check_and_update_config(config)
        monkeypatch.setenv(clib.KERNELS_ENV, "1")
        monkeypatch.setenv("CC", "/nonexistent/cc")
        monkeypatch.setenv("PATH", "/nonexistent")
        monkeypatch.setenv(clib.CACHE_ENV, "/nonexistent-cache-dir/x")
        clib.reset()
        with pytest.raises(
            ConfigError, match=f"{clib.KERNELS_ENV}=1 but the CPU kernels are not used: no C compiler"
        ):
            CpuPlatform().check_and_update_config(config)
    finally:
        monkeypatch.undo()
        clib.reset()


def test_greedy_argmax_in_c_has_torch_max_semantics() -> None:
    """The C row argmax (the Sampler's greedy rows on this platform) picks exactly torch.max's index:
    the first maximum, the first NaN, ties of -0.0 and +0.0, all -inf, strided rows, every length."""
    kernels, why = clib.status()
    if kernels is None:
        pytest.skip(f"CPU kernels unavailable: {why}")
    # the conformance suite's edge rows (the py env has it; an env without it, e.g. cpu-ipex, skips)
    cases_module = pytest.importorskip("pagedllm_conformance.ops_cases", reason="needs pagedllm-conformance")
    g = torch.Generator().manual_seed(3)
    rows = cases_module.argmax_edge_rows(g)  # row 4's NaN is in the scalar tail, row 8's tie across vector lanes
    cases = [rows, rows[:, :7], rows[:, 3:], torch.randn(64, 49152, generator=g), torch.randn(3, 1)]
    for x in cases:
        for threads in (1, 3):
            assert torch.equal(kernels.argmax_rows(x, threads=threads), torch.max(x, -1).indices), (x.shape, threads)
    platform = CpuPlatform()
    assert torch.equal(platform.greedy_argmax(rows), torch.max(rows, -1).indices)
    half = rows.to(torch.bfloat16)  # not fp32: torch's own
    assert torch.equal(platform.greedy_argmax(half), torch.max(half, -1).indices)
    same = rows[2:3].expand(4, 100)  # rows that overlap: torch's own too
    assert platform.greedy_argmax(same).tolist() == [10] * 4
    with pytest.raises(ValueError, match="argmax_rows takes fp32"):
        kernels.argmax_rows(rows.t())
