"""The manifest schema: tolerances resolve group, then dtype-wide, then default; bad manifests are refused."""

from __future__ import annotations

import textwrap

import pytest
import tomllib
import torch
from pagedllm_conformance.manifest import DEFAULT_TOLERANCES, Exclusion, ManifestError, parse_manifest


def manifest(text: str):
    return parse_manifest(tomllib.loads(textwrap.dedent(text)), "test.toml")


def test_group_tolerance_wins_over_dtype_wide_which_wins_over_default() -> None:
    m = manifest("""
        [tolerances.float32]
        atol = 2e-5
        rtol = 3e-5
        [tolerances.float32.ops]
        atol = 1e-4
        rtol = 0
    """)
    assert (m.tolerance(torch.float32, "attention").atol, m.tolerance(torch.float32, "attention").rtol) == (2e-5, 3e-5)
    assert (m.tolerance(torch.float32, "ops").atol, m.tolerance(torch.float32, "ops").rtol) == (1e-4, 0.0)
    assert m.tolerance(torch.bfloat16, "attention") == DEFAULT_TOLERANCES["bfloat16"]["attention"]
    assert m.tolerance(torch.float32, "ops").declared


def test_dtype_wide_tolerance_does_not_loosen_exact_groups() -> None:
    m = manifest("""
        [tolerances.float32]
        atol = 1e-4
        rtol = 1e-4
    """)
    assert m.tolerance(torch.float32, "kv_cache").atol == 0.0
    assert m.tolerance(torch.float32, "communicator").atol == 0.0
    assert {d["group"] for d in m.tolerance_deviations()} == {"attention", "ops"}


def test_tolerance_past_the_ceiling_is_refused() -> None:
    with pytest.raises(ManifestError, match="looser than the suite allows"):
        manifest("""
            [tolerances.float32.attention]
            atol = 0.5
            rtol = 0
        """)


@pytest.mark.parametrize("text, message", [
    ("[tolerance.float32]\natol = 1\n", "unknown top-level keys"),
    ("[tolerances.float64]\natol = 1e-5\nrtol = 1e-5\n", "unknown dtype"),
    ("[tolerances.float32.attn]\natol = 1e-5\nrtol = 1e-5\n", "unknown group"),
    ("[tolerances.float32.ops]\natol = 1e-5\n", "both atol and rtol"),
    ("[tolerances.float32.ops]\natol = -1\nrtol = 0\n", ">= 0"),
    ("[[exclusions]]\ntest = \"test_ops.py::*\"\n", "exactly the keys test and reason"),
    ("[[exclusions]]\ntest = \"test_ops.py::*\"\nreason = \" \"\n", "must say why"),
    ("[[exclusions]]\ntest = \"*\"\nreason = \"nothing works\"\n", "whole suite"),
])
def test_malformed_manifest_is_refused_with_the_offending_key(text: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        manifest(text)


def test_exclusion_globs_treat_brackets_literally_and_may_omit_the_file() -> None:
    e = Exclusion(test="test_attention.py::test_attention_output_matches_reference[soft_cap-*]", reason="r")
    assert e.matches("test_attention.py::test_attention_output_matches_reference[soft_cap-bs16-hs64-mha-h4kv4-float32]")
    assert not e.matches("test_attention.py::test_attention_output_matches_reference[decode-bs16-hs64-mha-h4kv4-float32]")
    short = Exclusion(test="test_op_matches_native_default[rotary_embedding-*]", reason="r")
    assert short.matches("test_ops.py::test_op_matches_native_default[rotary_embedding-t1-hs64-full-neox-float32]")
    assert not Exclusion(test="test_op_matches_native_default", reason="r").matches(
        "test_ops.py::test_op_matches_native_default[rms_norm-t1-h64-eps1e-6-float32]")


def test_empty_exclusions_table_means_nothing_excluded() -> None:
    assert manifest("[exclusions]\n").exclusions == []
