"""The CUDA platform in interpreter mode: CPU device, honest verification line, real Triton kernels."""

from __future__ import annotations

import logging

import pytest
import torch

from pagedllm.attention.backend import AttentionBatch, AttentionSpec
from pagedllm.attention.reference import ReferenceAttentionBackend
from pagedllm.config import EngineConfig, ModelConfig
from pagedllm.errors import ConfigError
from pagedllm.ops import native
from pagedllm.ops.registry import OPS
from pagedllm.plugin_registry import PluginRegistry

pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("interpreter-mode tests; this machine has a GPU", allow_module_level=True)

from pagedllm_cuda import hooks  # noqa: E402
from pagedllm_cuda.attention import CudaAttentionBackend  # noqa: E402
from pagedllm_cuda.platform import CudaInterpreterPlatform  # noqa: E402


@pytest.fixture
def platform() -> CudaInterpreterPlatform:
    return CudaInterpreterPlatform()


def test_interpreter_platform_runs_on_cpu_and_never_claims_a_gpu(platform) -> None:
    assert platform.name == "cuda" and platform.device_type == "cpu" and platform.dist_backend == "gloo"
    assert platform.verified_on == "verified under Triton interpreter on CPU (no GPU)"
    assert "no GPU" in platform.describe()["mode"]


def test_interpreter_config_is_fp32_and_eager(platform, caplog) -> None:
    config = EngineConfig()
    with caplog.at_level(logging.INFO):
        platform.check_and_update_config(config)
        platform.compile_or_capture(type("Runner", (), {"config": config})())
    assert config.model.dtype == torch.float32 and config.device.enforce_eager
    assert "graph capture skipped" in caplog.text
    with pytest.raises(ConfigError, match="bfloat16"):
        platform.check_and_update_config(EngineConfig(model=ModelConfig(dtype="bfloat16")))
    assert 0 < platform.kv_cache_budget(config) <= platform.free_memory()


def test_attention_backend_matches_reference_with_cuda_launch_configs(platform) -> None:
    spec = AttentionSpec(4, 2, 16, 0.25, torch.float32, block_size=4, sliding_window=6)
    backend, ref = platform.attention_backend(spec), ReferenceAttentionBackend(spec)
    assert isinstance(backend, CudaAttentionBackend)
    batch = AttentionBatch.build([7, 1], [10, 13], [[5, 0, 2], [1, 3, 4, 6]], 4)
    q, k, v = torch.randn(8, 4, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    kv, kv_ref = backend.allocate_kv_cache(7, "cpu"), ref.allocate_kv_cache(7, "cpu")
    kv.normal_()
    kv_ref.copy_(kv)
    out = backend.forward(q, k, v, kv, backend.build_metadata(batch))
    torch.testing.assert_close(out, ref.forward(q, k, v, kv_ref, batch), rtol=1e-5, atol=1e-5)


def test_registered_ops_are_triton_and_match_native() -> None:
    registry = PluginRegistry()
    try:
        hooks.pagedllm_register(registry=registry)
        assert set(OPS.overrides()) == {"rms_norm", "fused_add_rms_norm", "rotary_embedding",
                                        "silu_and_mul", "gelu_tanh_and_mul", "apply_token_bitmask"}
        assert all(owner == "pagedllm-cuda (triton)" for owner in OPS.overrides().values())
        x, w = torch.randn(3, 64), torch.randn(64)
        torch.testing.assert_close(OPS.rms_norm(x, w, 1e-6), native.rms_norm(x, w, 1e-6))
        torch.testing.assert_close(OPS.silu_and_mul(x), native.silu_and_mul(x))
    finally:
        registry.reset()
