"""Fixtures for model tests: tiny random checkpoints per architecture, built once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PAGEDLLM_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """arch -> path of a saved tiny random model (cached for the session)."""
    from pagedllm.model.testing import make_tiny_model

    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            cache[arch] = make_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return cache[arch]

    return get


@pytest.fixture(autouse=True)
def _single_thread():
    # The machine is shared; tiny matmuls gain nothing from more threads.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
