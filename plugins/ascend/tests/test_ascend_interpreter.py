"""The Triton path under triton-ascend's interpreter on CPU: honest verification line, Ascend configs, real kernels."""

from __future__ import annotations

import importlib.metadata
import os

import pytest
import torch
from pagedllm.plugin import (
    OPS,
    AttentionBatch,
    AttentionSpec,
    PluginRegistry,
    ReferenceAttentionBackend,
    native_ops,
)

try:
    importlib.metadata.version("triton-ascend")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("needs triton-ascend (tox -e ascend-interpret)", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("interpreter-mode tests; this machine has an NPU", allow_module_level=True)

from pagedllm_ascend.kernels.interpreter_platform import AscendInterpreterPlatform  # noqa: E402
from pagedllm_ascend.kernels.launch_configs import ASCEND_ATTENTION  # noqa: E402
from pagedllm_ascend.kernels.triton_attention import AscendTritonAttentionBackend  # noqa: E402
from pagedllm_ascend.ops import TRITON_OWNER, register_triton_ops  # noqa: E402


@pytest.fixture(scope="module")
def platform() -> AscendInterpreterPlatform:
    return AscendInterpreterPlatform()


def test_interpreter_twin_runs_on_cpu_and_says_so(platform) -> None:
    assert platform.name == "ascend" and platform.device_type == "cpu" and platform.dist_backend == "gloo"
    assert platform.verified_on == "verified under triton-ascend's interpreter on CPU (no NPU)"
    assert "triton-ascend's interpreter" in platform.describe()["mode"]


@pytest.mark.parametrize("window", [None, 6], ids=["causal", "sliding_window"])
def test_triton_attention_with_ascend_configs_matches_reference(platform, window) -> None:
    spec = AttentionSpec(8, 2, 32, 32**-0.5, torch.float32, block_size=16, sliding_window=window)
    backend, ref = platform.attention_backend(spec), ReferenceAttentionBackend(spec)
    assert isinstance(backend, AscendTritonAttentionBackend) and backend.launch_configs is ASCEND_ATTENTION
    batch = AttentionBatch.build([9, 1], [25, 17], [[3, 0], [1, 2]], 16)
    q, k, v = torch.randn(10, 8, 32), torch.randn(10, 2, 32), torch.randn(10, 2, 32)
    kv, kv_ref = backend.allocate_kv_cache(4, "cpu"), ref.allocate_kv_cache(4, "cpu")
    kv.normal_()
    kv_ref.copy_(kv)
    out = backend.forward(q, k, v, kv, backend.build_metadata(batch))
    torch.testing.assert_close(out, ref.forward(q, k, v, kv_ref, batch), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv, kv_ref)


def test_registered_triton_ops_match_native() -> None:
    registry = PluginRegistry()
    try:
        register_triton_ops(registry)
        assert set(OPS.overrides().values()) == {TRITON_OWNER}
        x, w = torch.randn(3, 64), torch.randn(64)
        torch.testing.assert_close(OPS.rms_norm(x, w, 1e-6), native_ops.rms_norm(x, w, 1e-6))
        g = torch.randn(3, 128)
        torch.testing.assert_close(OPS.silu_and_mul(g), native_ops.silu_and_mul(g))
    finally:
        registry.reset()
