"""Shared fixtures for engine tests: a tiny random Llama checkpoint built once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PAGEDLLM_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    from pagedllm.model.testing import make_tiny_model

    return make_tiny_model(
        "llama", tmp_path_factory.mktemp("tiny-llama"), seed=0, max_position_embeddings=1024
    )
