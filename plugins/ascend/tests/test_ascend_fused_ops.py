"""torch_npu's fused RMSNorm/rotary/SwiGLU, as registered op overrides, match the core's native ops (on the stand-in)."""

from __future__ import annotations

import pytest
import torch
import torch_npu_standin
from pagedllm.plugin import OPS, PluginRegistry, native_ops
from pagedllm_ascend.ops import FUSED_OWNER, register_fused_ops


@pytest.fixture
def fused_ops():
    registry = PluginRegistry()
    registry.reset()  # ops an earlier test's platform registered (the CPU plugin's) are not ours to count
    register_fused_ops(registry, torch_npu_standin)
    yield OPS
    registry.reset()


def test_fused_overrides_are_the_four_torch_npu_ops(fused_ops) -> None:
    overrides = fused_ops.overrides()
    assert set(overrides) == {"rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul"}
    assert set(overrides.values()) == {FUSED_OWNER}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_and_swiglu_match_native(fused_ops, dtype) -> None:
    x, r, w = (torch.randn(5, 96).to(dtype) for _ in range(3))
    torch.testing.assert_close(fused_ops.rms_norm(x, w, 1e-5), native_ops.rms_norm(x, w, 1e-5))
    y, s = fused_ops.fused_add_rms_norm(x, r, w, 1e-5)
    y_ref, s_ref = native_ops.fused_add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(s, s_ref)
    g = torch.randn(5, 2 * 96).to(dtype)
    torch.testing.assert_close(fused_ops.silu_and_mul(g), native_ops.silu_and_mul(g))


@pytest.mark.parametrize("rotary_dim", [64, 32], ids=["full", "partial"])
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_rotary_matches_native_with_gqa_heads(fused_ops, rotary_dim, neox) -> None:
    positions = torch.tensor([0, 3, 7, 100, 5])
    q, k = torch.randn(5, 8, 64), torch.randn(5, 2, 64)
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = torch.outer(torch.arange(128).float(), inv)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_position, rotary_dim]
    out_q, out_k = fused_ops.rotary_embedding(positions, q, k, cos_sin, neox)
    ref_q, ref_k = native_ops.rotary_embedding(positions, q, k, cos_sin, neox)
    torch.testing.assert_close(out_q, ref_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_k, ref_k, rtol=1e-5, atol=1e-5)
