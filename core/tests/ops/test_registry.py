"""The ops registry: native defaults, overrides through the plugin registry, reset."""

from __future__ import annotations

import pytest
import torch

from pagedllm.plugin import OPS, PluginRegistry, native_ops


def test_override_replaces_one_op_and_reset_restores_native() -> None:
    registry = PluginRegistry()
    calls = []

    def fake(x, w, eps):
        calls.append(1)
        return native_ops.rms_norm(x, w, eps)

    before = OPS.overrides()  # earlier tests in the same process may have installed a platform
    try:
        registry.override_op("rms_norm", fake, owner="test")
        assert OPS.owner("rms_norm") == "test"
        assert OPS.overrides() == {**before, "rms_norm": "test"}
        OPS.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6)
        assert calls == [1]
        if "silu_and_mul" not in before:
            assert OPS.silu_and_mul is native_ops.silu_and_mul
    finally:
        registry.reset()
    assert OPS.rms_norm is native_ops.rms_norm


def test_unknown_op_cannot_be_registered() -> None:
    with pytest.raises(KeyError, match="unknown op"):
        PluginRegistry().override_op("nope", lambda: None)


def test_native_fused_add_rms_norm_returns_normed_sum_and_residual() -> None:
    x, r, w = torch.randn(3, 8), torch.randn(3, 8), torch.rand(8)
    out, res = OPS.fused_add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(res, x + r)
    torch.testing.assert_close(out, native_ops.rms_norm(x + r, w, 1e-6))


def test_natives_runs_without_overrides_and_restores_them_even_on_error() -> None:
    from pagedllm.ops.registry import OpsRegistry

    registry = OpsRegistry()
    plugin_op = lambda x: x  # noqa: E731
    registry.override("silu_and_mul", plugin_op, owner="test")
    with registry.natives():
        assert registry.silu_and_mul is registry.default("silu_and_mul")
        assert registry.overrides() == {}
    assert registry.silu_and_mul is plugin_op and registry.owner("silu_and_mul") == "test"
    with pytest.raises(RuntimeError, match="boom"), registry.natives():
        raise RuntimeError("boom")
    assert registry.silu_and_mul is plugin_op


def test_a_reset_registry_is_registered_again_by_the_next_engine(monkeypatch) -> None:
    """After something resets the ops, the current platform's plugin registers again on next use."""
    from types import SimpleNamespace

    from pagedllm.platforms import discovery

    registrations = []

    def pagedllm_register(registry):
        registrations.append(1)
        registry.override_op("silu_and_mul", native_ops.silu_and_mul, owner="fake")

    plugin = SimpleNamespace(name="fake", module=SimpleNamespace(pagedllm_register=pagedllm_register))
    selection = discovery.Selection(platform=object(), plugin=plugin, why="test", plugins=[])
    monkeypatch.setattr(discovery, "select_platform", lambda name=None: selection)
    monkeypatch.setattr(discovery, "_CURRENT", None)
    monkeypatch.setattr(discovery, "_REGISTERED_GENERATION", None)
    try:
        assert discovery.current_selection() is selection and registrations == [1]
        assert discovery.current_selection() is selection and registrations == [1]  # registered once
        PluginRegistry().reset()
        assert OPS.owner("silu_and_mul") == "native"
        assert discovery.current_selection() is selection and registrations == [1, 1]
        assert OPS.owner("silu_and_mul") == "fake"
    finally:
        PluginRegistry().reset()  # the next engine re-registers the real platform
