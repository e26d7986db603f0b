"""Ops group: the active implementation of every named op (plugin override or native) against the native default."""

from __future__ import annotations

import pytest
import torch
from pagedllm.plugin import OPS

from pagedllm_conformance.checks import CheckRecord, Conformance
from pagedllm_conformance.ops_cases import as_outputs, op_grid, textbook
from pagedllm_conformance.pytest_plugin import session_state


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "op_case" in metafunc.fixturenames:
        state = session_state(metafunc.config)
        cases = op_grid(OPS.names(), state.dtypes(), state.quick)
        metafunc.parametrize("op_case", cases, ids=[c.id for c in cases])


def _to(value: object, device: torch.device, float32: bool) -> object:
    if not isinstance(value, torch.Tensor):
        return value
    if float32 and value.dtype.is_floating_point:
        value = value.float()
    return value.to(device)


def _check_oracle(conformance, name: str, args: dict, expected: list[torch.Tensor], dtype: torch.dtype) -> None:
    """The native default itself against the op's textbook definition (fp64): a broken oracle fails loudly."""
    reference = textbook(name, {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v)
                                for k, v in args.items()})
    if reference is None:
        raise AssertionError(f"the conformance suite has no textbook definition of op {name!r}; add it to ops_cases.py")
    scratch = Conformance(conformance.manifest, CheckRecord())  # the oracle's error is not the platform's
    for i, (native_out, exact) in enumerate(zip(expected, reference, strict=True)):
        try:
            scratch.assert_close(native_out, exact, dtype=torch.float32, group="ops", what=f"{name} output {i}")
        except AssertionError as exc:
            raise AssertionError(f"the core's native {name} disagrees with its definition: {exc}") from None


def test_op_matches_native_default(op_case, conformance_target, conformance) -> None:
    """The op as models call it on this platform (the plugin's override if it registered one) returns the
    input dtype and matches the core's torch-native default computed in fp32 on the host, within the ops
    tolerance (the native default itself is first checked against the op's fp64 textbook definition);
    rotary_embedding leaves its inputs untouched."""
    name, dtype = op_case.op, op_case.dtype
    if op_case.make is None:
        raise AssertionError(f"the conformance suite has no inputs for op {name!r}; add them to ops_cases.py")
    platform = conformance_target.platform
    device = platform.device()
    args = op_case.make(torch.Generator().manual_seed(op_case.seed), dtype)
    impl, native = getattr(OPS, name), OPS.default(name)
    conformance.note(op=name, owner=OPS.owner(name), variant=op_case.variant, dtype=str(dtype))
    # Copies: an in-place op (apply_token_bitmask) must not write into the oracle's inputs.
    dev_args = {k: _to(v.clone() if isinstance(v, torch.Tensor) else v, device, False) for k, v in args.items()}
    snapshot = {k: v.detach().cpu().clone() for k, v in dev_args.items() if isinstance(v, torch.Tensor)}
    got = as_outputs(impl(**dev_args))
    platform.synchronize()
    expected = as_outputs(native(**{k: _to(v, torch.device("cpu"), True) for k, v in args.items()}))
    _check_oracle(conformance, name, args, expected, dtype)
    conformance.assert_equal_values(len(got), len(expected), what=f"{name}: number of outputs")
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        conformance.assert_equal_values(g.dtype, dtype, what=f"{name} output {i} dtype")
        conformance.assert_close(g, e, dtype=dtype, group="ops", what=f"{name} output {i} vs native fp32")
    if name == "rotary_embedding":
        for k, before in snapshot.items():
            conformance.assert_exact(dev_args[k], before, dtype=before.dtype, what=f"{name} input {k} after the call")
