"""A backend's conformance manifest (`conformance.toml`): its declared tolerances and exclusions.

The manifest lives in the plugin's own package, next to its hooks module. Everything it
declares that differs from the suite's defaults is a *declared deviation* and is listed in
every report; an exclusion turns matching tests into skips that carry the declared reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

import tomllib
import torch

MANIFEST_NAME = "conformance.toml"

# Groups whose numeric checks take a tolerance. "kv_cache" (bytes written to the cache),
# "copy_blocks" and "communicator" are exact unless a backend declares otherwise.
TOLERANCE_GROUPS = ("attention", "kv_cache", "ops", "communicator", "logprobs")
# A dtype-wide declaration ([tolerances.float32] atol/rtol) covers kernel outputs only; the exact
# groups and the model-level logprobs are loosened only by naming them.
WIDE_GROUPS = ("attention", "ops")

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class Tolerance:
    """Allowed error of one check: |actual - expected| <= atol + rtol * |expected|."""

    atol: float
    rtol: float
    declared: bool = False  # True when it comes from the backend's manifest, not the defaults

    def as_dict(self) -> dict[str, Any]:
        return {"atol": self.atol, "rtol": self.rtol, "declared": self.declared}


def _tol(atol: float, rtol: float) -> Tolerance:
    return Tolerance(atol=atol, rtol=rtol)


# The suite's defaults: what an fp32 backend that merely reorders sums achieves, and what
# the rounding of a 16-bit output type forces (bf16 keeps 8 bits of mantissa, fp16 11).
DEFAULT_TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "float32": {
        "attention": _tol(1e-5, 1e-5),
        "kv_cache": _tol(0.0, 0.0),
        "ops": _tol(1e-5, 1e-5),
        "communicator": _tol(0.0, 0.0),
        "logprobs": _tol(1e-3, 0.0),
    },
    "float16": {
        "attention": _tol(2e-3, 2e-3),
        "kv_cache": _tol(0.0, 0.0),
        "ops": _tol(2e-3, 2e-3),
        "communicator": _tol(0.0, 0.0),
        "logprobs": _tol(5e-2, 0.0),
    },
    "bfloat16": {
        "attention": _tol(2e-2, 2e-2),
        "kv_cache": _tol(0.0, 0.0),
        "ops": _tol(2e-2, 2e-2),
        "communicator": _tol(0.0, 0.0),
        "logprobs": _tol(2.5e-1, 0.0),
    },
}

# No manifest may loosen a tolerance past these: beyond them a check no longer detects a
# wrong kernel (a dropped soft-cap or a mis-mapped head moves outputs by ~1e-1 or more).
TOLERANCE_CEILINGS: dict[str, dict[str, float]] = {
    "float32": {"attention": 1e-3, "kv_cache": 1e-3, "ops": 1e-3, "communicator": 1e-3, "logprobs": 5e-2},
    "float16": {"attention": 1e-2, "kv_cache": 1e-2, "ops": 1e-2, "communicator": 1e-2, "logprobs": 0.5},
    "bfloat16": {"attention": 5e-2, "kv_cache": 5e-2, "ops": 5e-2, "communicator": 5e-2, "logprobs": 1.0},
}


class ManifestError(ValueError):
    """The manifest is malformed; the message names the file and the offending key."""


def _glob_regex(pattern: str) -> re.Pattern[str]:
    # Only * and ? are wildcards: test ids contain [ and ] literally.
    parts = []
    for ch in pattern:
        if ch == "*":
            parts.append(".*")
        elif ch == "?":
            parts.append(".")
        else:
            parts.append(re.escape(ch))
    return re.compile("".join(parts) + r"\Z", re.DOTALL)


@dataclass(slots=True)
class Exclusion:
    """A test (or glob of tests) the backend declares it does not pass, and why."""

    test: str
    reason: str
    _regex: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._regex = _glob_regex(self.test)

    def matches(self, test_id: str) -> bool:
        """``test_id`` is ``file::name[params]``; the pattern may also omit the ``file::`` part."""
        if self._regex.match(test_id):
            return True
        _, sep, short = test_id.partition("::")
        return bool(sep) and bool(self._regex.match(short))


@dataclass(slots=True)
class Manifest:
    """Declared tolerances and exclusions of one backend (empty when it ships no manifest)."""

    source: str | None = None  # path of the file, None when the plugin ships none
    verified_on: str | None = None
    # dtype -> group -> declared tolerance ("*" is the dtype-wide declaration)
    tolerances: dict[str, dict[str, Tolerance]] = field(default_factory=dict)
    exclusions: list[Exclusion] = field(default_factory=list)

    def tolerance(self, dtype: torch.dtype | str, group: str) -> Tolerance:
        """The tolerance a check of ``group`` in ``dtype`` must meet: group, then dtype-wide, then default."""
        name = dtype if isinstance(dtype, str) else dtype_name(dtype)
        if group not in TOLERANCE_GROUPS:
            raise KeyError(f"unknown tolerance group {group!r}; known: {', '.join(TOLERANCE_GROUPS)}")
        if name not in DEFAULT_TOLERANCES:
            raise KeyError(f"no tolerances defined for dtype {name}")
        declared = self.tolerances.get(name, {})
        if group in declared:
            return declared[group]
        if "*" in declared and group in WIDE_GROUPS:
            return declared["*"]
        return DEFAULT_TOLERANCES[name][group]

    def exclusion_for(self, test_id: str) -> Exclusion | None:
        for exclusion in self.exclusions:
            if exclusion.matches(test_id):
                return exclusion
        return None

    def tolerance_deviations(self) -> list[dict[str, Any]]:
        """Every declared tolerance, with the default it replaces (declared deviations)."""
        rows = []
        for dtype, groups in sorted(self.tolerances.items()):
            for group, tol in sorted(groups.items()):
                affected = WIDE_GROUPS if group == "*" else (group,)
                for g in affected:
                    if group == "*" and g in groups:
                        continue  # a group-specific declaration wins over the dtype-wide one
                    default = DEFAULT_TOLERANCES[dtype][g]
                    if (tol.atol, tol.rtol) == (default.atol, default.rtol):
                        continue
                    rows.append(
                        {
                            "kind": "tolerance",
                            "dtype": dtype,
                            "group": g,
                            "atol": tol.atol,
                            "rtol": tol.rtol,
                            "default_atol": default.atol,
                            "default_rtol": default.rtol,
                            "looser": tol.atol > default.atol or tol.rtol > default.rtol,
                        }
                    )
        return rows


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ManifestError(f"{where} must be a number, got {value!r}")
    if value < 0 or value != value:
        raise ManifestError(f"{where} must be >= 0, got {value!r}")
    return float(value)


def _parse_tolerance(table: Any, where: str, dtype: str, groups: tuple[str, ...]) -> Tolerance:
    if not isinstance(table, dict):
        raise ManifestError(f"{where} must be a table with atol and rtol")
    unknown = set(table) - {"atol", "rtol"}
    if unknown:
        raise ManifestError(f"{where} has unknown keys {sorted(unknown)}; only atol and rtol are allowed")
    if "atol" not in table or "rtol" not in table:
        raise ManifestError(f"{where} must set both atol and rtol")
    atol, rtol = _number(table["atol"], f"{where}.atol"), _number(table["rtol"], f"{where}.rtol")
    for g in groups:
        ceiling = TOLERANCE_CEILINGS[dtype][g]
        if atol > ceiling or rtol > ceiling:
            raise ManifestError(
                f"{where} (atol {atol:g}, rtol {rtol:g}) is looser than the suite allows for "
                f"{dtype} {g} checks ({ceiling:g}); a check that loose cannot tell a broken kernel "
                "from a correct one"
            )
    return Tolerance(atol=atol, rtol=rtol, declared=True)


def parse_manifest(data: dict[str, Any], source: str | None) -> Manifest:
    """Validate a parsed TOML document; unknown keys are errors so typos cannot pass silently."""
    where = source or "<manifest>"
    unknown = set(data) - {"platform", "tolerances", "exclusions"}
    if unknown:
        raise ManifestError(
            f"{where}: unknown top-level keys {sorted(unknown)}; allowed: platform, tolerances, exclusions"
        )
    manifest = Manifest(source=source)
    platform = data.get("platform", {})
    if not isinstance(platform, dict) or set(platform) - {"verified_on"}:
        raise ManifestError(f"{where}: [platform] may only set verified_on")
    if "verified_on" in platform:
        if not isinstance(platform["verified_on"], str) or not platform["verified_on"].strip():
            raise ManifestError(f"{where}: [platform] verified_on must be a non-empty string")
        manifest.verified_on = platform["verified_on"].strip()
    tolerances = data.get("tolerances", {})
    if not isinstance(tolerances, dict):
        raise ManifestError(f"{where}: [tolerances] must be a table")
    for dtype, table in tolerances.items():
        if dtype not in DEFAULT_TOLERANCES:
            raise ManifestError(
                f"{where}: [tolerances.{dtype}] names an unknown dtype; use one of {', '.join(DEFAULT_TOLERANCES)}"
            )
        if not isinstance(table, dict):
            raise ManifestError(f"{where}: [tolerances.{dtype}] must be a table")
        per_group: dict[str, Tolerance] = {}
        wide = {k: v for k, v in table.items() if k in ("atol", "rtol")}
        if wide:
            per_group["*"] = _parse_tolerance(wide, f"{where}: [tolerances.{dtype}]", dtype, WIDE_GROUPS)
        for key, value in table.items():
            if key in ("atol", "rtol"):
                continue
            if key not in TOLERANCE_GROUPS:
                raise ManifestError(
                    f"{where}: [tolerances.{dtype}.{key}] names an unknown group; use one of "
                    f"{', '.join(TOLERANCE_GROUPS)}"
                )
            per_group[key] = _parse_tolerance(value, f"{where}: [tolerances.{dtype}.{key}]", dtype, (key,))
        manifest.tolerances[dtype] = per_group
    exclusions = data.get("exclusions", [])
    if exclusions == {}:
        exclusions = []  # an empty [exclusions] table reads naturally as "nothing excluded"
    if not isinstance(exclusions, list):
        raise ManifestError(f"{where}: exclusions must be an array of tables ([[exclusions]])")
    for i, entry in enumerate(exclusions):
        here = f"{where}: exclusions[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"test", "reason"}:
            raise ManifestError(f"{here} must have exactly the keys test and reason")
        test, reason = entry["test"], entry["reason"]
        if not isinstance(test, str) or not test.strip():
            raise ManifestError(f"{here}.test must be a non-empty test id or glob")
        if not isinstance(reason, str) or not reason.strip():
            raise ManifestError(f"{here}.reason must say why (a non-empty string)")
        if test.strip() in ("*", "**"):
            raise ManifestError(f"{here}.test {test!r} would exclude the whole suite")
        manifest.exclusions.append(Exclusion(test=test.strip(), reason=reason.strip()))
    return manifest


def load_manifest_file(path: Path | str) -> Manifest:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: not valid TOML: {exc}") from exc
    return parse_manifest(data, str(path))


def manifest_location(module: ModuleType | None) -> Any | None:
    """Where a plugin's manifest would live: its hooks module's package directory."""
    if module is None:
        return None
    package = module.__package__ or module.__name__.rpartition(".")[0] or module.__name__
    try:
        return resources.files(package) / MANIFEST_NAME
    except (ModuleNotFoundError, TypeError):
        return None


def load_plugin_manifest(module: ModuleType | None) -> Manifest:
    """The manifest shipped next to a plugin's hooks module, or an empty one when it ships none."""
    location = manifest_location(module)
    if location is None or not location.is_file():
        return Manifest(source=None)
    try:
        data = tomllib.loads(location.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{location}: not valid TOML: {exc}") from exc
    return parse_manifest(data, str(location))
