"""The Triton RMSNorm, rotary and gated-activation kernels against the torch-native ops."""

from __future__ import annotations

import pytest
import torch

from pagedllm.kernels.triton import LaunchConfig, activation, rms_norm, rotary
from pagedllm.ops import native

CONFIG = LaunchConfig(block_n=32)  # feature tiles of 32: the activation case below spans 3 tiles


def test_rms_norm_matches_native_on_non_power_of_two_hidden(device) -> None:
    x, w = torch.randn(2, 3, 40, device=device), torch.randn(40, device=device)
    torch.testing.assert_close(rms_norm.rms_norm(x, w, 1e-5, config=CONFIG), native.rms_norm(x, w, 1e-5))


def test_fused_add_rms_norm_returns_norm_and_new_residual(device) -> None:
    x, r, w = torch.randn(5, 24, device=device), torch.randn(5, 24, device=device), torch.randn(24, device=device)
    out, summed = rms_norm.fused_add_rms_norm(x, r, w, 1e-6, config=CONFIG)
    expected_out, expected_sum = native.fused_add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(summed, expected_sum, rtol=0, atol=0)


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_rotary_matches_native_with_partial_rotary_dim(device, is_neox) -> None:
    head_size, rotary_dim = 16, 12  # the last 4 features pass through unrotated
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = torch.outer(torch.arange(32).float(), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)
    positions = torch.tensor([0, 5, 31, 2, 17], device=device)
    q, k = torch.randn(5, 4, head_size, device=device), torch.randn(5, 2, head_size, device=device)
    q_out, k_out = rotary.rotary_embedding(positions, q, k, cos_sin, is_neox, config=CONFIG)
    q_exp, k_exp = native.rotary_embedding(positions, q, k, cos_sin, is_neox)
    torch.testing.assert_close(q_out, q_exp)
    torch.testing.assert_close(k_out, k_exp)
    assert not torch.equal(q_out, q)  # new tensors; the inputs are left alone


@pytest.mark.parametrize("name", ["silu_and_mul", "gelu_tanh_and_mul"])
def test_gated_activation_matches_native_across_feature_tiles(device, name) -> None:
    x = torch.randn(3, 2, 2 * 70, device=device) * 3
    torch.testing.assert_close(getattr(activation, name)(x, config=CONFIG), getattr(native, name)(x))


def test_bad_shapes_are_clear_errors(device) -> None:
    with pytest.raises(ValueError, match="features"):
        rms_norm.rms_norm(torch.zeros(2, 8, device=device), torch.ones(4, device=device), 1e-6, config=CONFIG)
    with pytest.raises(ValueError, match="even"):
        activation.silu_and_mul(torch.zeros(2, 7, device=device), config=CONFIG)
    with pytest.raises(ValueError, match="rotary_dim"):
        rotary.rotary_embedding(torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, 4), torch.zeros(1, 1, 4),
                                torch.zeros(4, 6), config=CONFIG)


def test_launch_config_rejects_non_power_of_two_blocks() -> None:
    with pytest.raises(ValueError, match="block_n"):
        LaunchConfig(block_n=48)
