"""The plugin's wheel carries what it needs at run time: the C kernel sources are built on first use."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
from pagedllm_cpu.kernels import clib

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_sources_are_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["pagedllm_cpu"]
    package = ROOT / "src" / "pagedllm_cpu"
    for source in clib.SOURCES:
        relative = source.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), f"{relative} is not package data"


def test_a_missing_kernel_source_is_a_readable_unavailability(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(clib, "SOURCES", (tmp_path / "gone.c",))
    monkeypatch.setenv(clib.CACHE_ENV, str(tmp_path / "cache"))
    clib.reset()
    try:
        kernels, why = clib.status()
        assert kernels is None and "kernel source missing" in why
    finally:
        monkeypatch.undo()
        clib.reset()
