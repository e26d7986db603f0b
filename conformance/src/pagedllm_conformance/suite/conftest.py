"""Fixtures shared by the suite's model-level groups: tiny random checkpoints built once per run."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PAGEDLLM_NO_PROGRESS", "1")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # After -k deselection: if the default model's parity test will run, start its oracle now.
    if any(getattr(item, "originalname", "") == "test_default_model_greedy_generation_matches_reference"
           for item in items):
        from pagedllm_conformance.generation import (
            DEFAULT_MAX_TOKENS,
            DEFAULT_PROMPTS,
            start_background_oracle,
        )

        start_background_oracle(None, DEFAULT_PROMPTS, DEFAULT_MAX_TOKENS)


def pytest_sessionfinish() -> None:
    from pagedllm_conformance.generation import stop_background_oracles

    stop_background_oracles()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """arch -> directory of a tiny random HF checkpoint of that architecture (built offline, seed 0)."""
    from pagedllm.model.testing import make_tiny_model

    built: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in built:
            built[arch] = make_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), seed=0)
        return built[arch]

    return get
