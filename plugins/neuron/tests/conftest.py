"""Fixtures of pagedllm-neuron's tests: the prompts and the XLA:CPU twin switch."""

from __future__ import annotations

import pytest

# A dozen varied prompts: code, lists, dialogue, numbers, non-English, one very short.
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three colors:",
    "Q: What is 12 times 12?\nA:",
    "Hi",
    "The three laws of thermodynamics are",
    "import numpy as np\nx = np.",
    "Translate to French: good morning ->",
    "My favourite recipe for pancakes starts with",
    "1, 1, 2, 3, 5, 8,",
    "In 1969, astronauts",
]


@pytest.fixture
def xla_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turn the XLA:CPU twins on (PAGEDLLM_XLA_CPU=1) for one test."""
    monkeypatch.setenv("PAGEDLLM_XLA_CPU", "1")
    monkeypatch.setenv("PJRT_DEVICE", "CPU")


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return list(PROMPTS)
