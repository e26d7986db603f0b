"""The ROCm platform in interpreter mode: its own (wavefront-64) launch configs on the shared kernels."""

from __future__ import annotations

import pytest
import torch

from pagedllm.attention.backend import AttentionBatch, AttentionSpec
from pagedllm.attention.reference import ReferenceAttentionBackend
from pagedllm.ops import native
from pagedllm.ops.registry import OPS
from pagedllm.plugin_registry import PluginRegistry

pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("interpreter-mode tests; this machine has a GPU", allow_module_level=True)

from pagedllm_rocm import hooks  # noqa: E402
from pagedllm_rocm.attention import ROCM_ATTENTION, RocmAttentionBackend  # noqa: E402
from pagedllm_rocm.platform import RocmInterpreterPlatform  # noqa: E402


def test_interpreter_platform_runs_on_cpu_and_never_claims_a_gpu() -> None:
    platform = RocmInterpreterPlatform()
    assert platform.name == "rocm" and platform.device_type == "cpu"
    assert platform.verified_on == "verified under Triton interpreter on CPU (no GPU)"
    assert "64-lane wavefronts" in platform.describe()["launch"]


def test_mqa_soft_cap_attention_matches_reference_with_rocm_launch_configs() -> None:
    spec = AttentionSpec(4, 1, 8, 0.3, torch.float32, block_size=8, logit_soft_cap=10.0)
    backend, ref = RocmInterpreterPlatform().attention_backend(spec), ReferenceAttentionBackend(spec)
    assert isinstance(backend, RocmAttentionBackend) and backend.launch_configs is ROCM_ATTENTION
    batch = AttentionBatch.build([12, 0, 1], [12, 3, 40], [[2, 0], [1], [3, 4, 5, 6, 7]], 8)
    q, k, v = torch.randn(13, 4, 8), torch.randn(13, 1, 8), torch.randn(13, 1, 8)
    kv, kv_ref = backend.allocate_kv_cache(8, "cpu"), ref.allocate_kv_cache(8, "cpu")
    kv.normal_()
    kv_ref.copy_(kv)
    out = backend.forward(q, k, v, kv, backend.build_metadata(batch))
    torch.testing.assert_close(out, ref.forward(q, k, v, kv_ref, batch), rtol=1e-5, atol=1e-5)


def test_registered_rotary_is_triton_and_matches_native() -> None:
    registry = PluginRegistry()
    try:
        hooks.pagedllm_register(registry=registry)
        assert OPS.owner("rotary_embedding") == "pagedllm-rocm (triton)"
        cos_sin = torch.randn(16, 8)
        positions, q, k = torch.tensor([3, 9]), torch.randn(2, 2, 8), torch.randn(2, 1, 8)
        for got, want in zip(OPS.rotary_embedding(positions, q, k, cos_sin), native.rotary_embedding(positions, q, k, cos_sin), strict=True):
            torch.testing.assert_close(got, want)
    finally:
        registry.reset()
