"""The ops cases reach edge magnitudes for every registered op, and on them a norm with eps in the
wrong place is out of tolerance in every dtype, even at the loosest tolerance a manifest may declare."""

from __future__ import annotations

import pytest
import torch
from pagedllm.plugin import OPS
from pagedllm_conformance.checks import CheckRecord, Conformance
from pagedllm_conformance.manifest import TOLERANCE_CEILINGS, Manifest, Tolerance
from pagedllm_conformance.ops_cases import as_outputs, op_grid

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_every_registered_op_has_edge_magnitude_cases_even_in_the_quick_grid():
    cases = op_grid(OPS.names(), [torch.float32], quick=True)
    for name in OPS.names():
        assert any(c.op == name and c.variant.startswith("edge") for c in cases), f"{name} has no edge case"


def _eps_outside_sqrt(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf / (xf.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight.float()).to(x.dtype)


def _eps_dropped(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return OPS.default("rms_norm")(x, weight, 0.0)


def _ceiling(dtype: torch.dtype) -> Conformance:
    name = str(dtype).removeprefix("torch.")
    loosest = TOLERANCE_CEILINGS[name]["ops"]
    return Conformance(Manifest(tolerances={name: {"ops": Tolerance(loosest, loosest)}}), CheckRecord())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("bug", [_eps_outside_sqrt, _eps_dropped], ids=["eps_outside_sqrt", "eps_dropped"])
def test_misplaced_eps_fails_the_edge_rms_norm_cases_and_passes_the_ordinary_ones(bug, dtype):
    conformance = _ceiling(dtype)
    native = OPS.default("rms_norm")
    caught = []
    for case in op_grid(["rms_norm"], [dtype], quick=False):
        args = case.make(torch.Generator().manual_seed(case.seed), dtype)
        expected = as_outputs(native(**{k: v.float() if isinstance(v, torch.Tensor) else v for k, v in args.items()}))
        try:
            conformance.assert_close(bug(**args), expected[0], dtype=dtype, group="ops", what=case.id)
        except AssertionError:
            caught.append(case.variant)
    # The ordinary cases cannot see the change (which is how it once passed); the edge cases must.
    assert len(caught) >= 2 and all(v.startswith("edge") for v in caught), caught
