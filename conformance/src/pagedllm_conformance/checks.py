"""The per-test recorder: tolerance-aware comparisons whose worst errors end up in the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from pagedllm_conformance.manifest import Manifest, Tolerance, dtype_name


@dataclass(slots=True)
class CheckRecord:
    """What one test verified: the tolerance it used and the worst error it saw."""

    tolerance: dict[str, Any] | None = None
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    checks: int = 0
    stated_skip: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "checks": self.checks,
            "details": self.details,
        }


def error_stats(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(max abs error, max relative error, per-element abs error) in fp64 on the host.

    A NaN or inf where the expectation is finite counts as an infinite error; NaN where NaN
    is expected, or the same infinity, counts as equal.
    """
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if a.numel() == 0:
        return 0.0, 0.0, torch.zeros_like(a)
    diff = (a - e).abs()
    if not bool(torch.isfinite(diff).all()):  # rare path: non-finite values somewhere
        equal = (torch.isnan(a) & torch.isnan(e)) | (torch.isinf(a) & (a == e))
        diff = torch.where(torch.isfinite(diff), diff, torch.full_like(diff, float("inf")))
        diff = diff.masked_fill(equal, 0.0)
    rel = diff / e.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).clamp_min(1e-12)
    rel = rel.masked_fill(diff == 0, 0.0)
    return float(diff.max()), float(rel.max()), diff


class Conformance:
    """Handed to every suite test as the ``conformance`` fixture."""

    def __init__(self, manifest: Manifest, record: CheckRecord) -> None:
        self.manifest = manifest
        self.record = record

    def tolerance(self, dtype: torch.dtype, group: str) -> Tolerance:
        return self.manifest.tolerance(dtype, group)

    def _note_tolerance(self, dtype: torch.dtype, group: str, tol: Tolerance) -> None:
        entry = {"dtype": dtype_name(dtype), "group": group, **tol.as_dict()}
        if self.record.tolerance is None:
            self.record.tolerance = entry
        elif self.record.tolerance != entry:
            # Several tolerances in one test: keep the loosest, which is what bounded the verdict.
            old = self.record.tolerance
            if (tol.atol, tol.rtol) > (old["atol"], old["rtol"]):
                self.record.tolerance = entry

    def _note_error(self, abs_err: float, rel_err: float) -> None:
        r = self.record
        r.checks += 1
        r.max_abs_err = abs_err if r.max_abs_err is None else max(r.max_abs_err, abs_err)
        r.max_rel_err = rel_err if r.max_rel_err is None else max(r.max_rel_err, rel_err)

    def assert_close(
        self,
        actual: torch.Tensor,
        expected: torch.Tensor,
        *,
        dtype: torch.dtype,
        group: str,
        what: str,
    ) -> None:
        """|actual - expected| <= atol + rtol * |expected| elementwise, with the declared tolerance."""
        self._compare(actual, expected, self.tolerance(dtype, group), dtype, group, what)

    def assert_exact(self, actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype, what: str) -> None:
        """Bit-for-bit equality (NaN equals NaN); no manifest can loosen it."""
        self._compare(actual, expected, Tolerance(0.0, 0.0), dtype, "exact", what)

    def assert_error_within(self, abs_err: float, magnitude: float, *, dtype: torch.dtype, group: str,
                            what: str) -> None:
        """For errors measured elsewhere (e.g. in a spawned rank): abs_err <= atol + rtol * magnitude."""
        tol = self.tolerance(dtype, group)
        self._note_tolerance(dtype, group, tol)
        rel = abs_err / magnitude if magnitude > 0 else (0.0 if abs_err == 0 else float("inf"))
        self._note_error(abs_err, rel)
        if not abs_err <= tol.atol + tol.rtol * magnitude:
            raise AssertionError(
                f"{what}: max abs error {abs_err:.3g} exceeds atol {tol.atol:g} + rtol {tol.rtol:g} x {magnitude:.3g}"
            )

    def _compare(self, actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance, dtype: torch.dtype,
                 group: str, what: str) -> None:
        self._note_tolerance(dtype, group, tol)
        if actual.shape == expected.shape and actual.dtype == expected.dtype and torch.equal(
            actual.detach().cpu(), expected.detach().cpu()
        ):
            self._note_error(0.0, 0.0)  # bit-identical: the common case of exact checks, cheaply
            return
        abs_err, rel_err, diff = error_stats(actual, expected)
        self._note_error(abs_err, rel_err)
        e = expected.detach().to("cpu", torch.float64)
        bad = diff > tol.atol + tol.rtol * e.abs().nan_to_num(0.0)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            a = actual.detach().to("cpu", torch.float64)
            raise AssertionError(
                f"{what}: {int(bad.sum())} of {bad.numel()} elements out of tolerance "
                f"(atol {tol.atol:g}, rtol {tol.rtol:g}, {dtype_name(dtype)} {group}); "
                f"max abs error {abs_err:.3g}, max rel error {rel_err:.3g}; first at index {first}: "
                f"got {float(a[first]):.6g}, expected {float(e[first]):.6g}"
            )

    def assert_equal_values(self, actual: Any, expected: Any, *, what: str) -> None:
        """Equality of plain values (token ids, counts); counted as a check with error 0 or 1."""
        ok = actual == expected
        self._note_error(0.0 if ok else 1.0, 0.0 if ok else 1.0)
        if not ok:
            raise AssertionError(f"{what}: got {actual!r}, expected {expected!r}")

    def note(self, **details: Any) -> None:
        """Facts for the report (what exactly was run), e.g. case parameters or op owner."""
        self.record.details.update(details)

    def skip_stated(self, reason: str) -> None:
        """A skip the suite itself states (e.g. one device cannot run a 2-rank test); not a failure."""
        self.record.stated_skip = reason
        pytest.skip(reason)
