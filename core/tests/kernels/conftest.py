"""Kernel tests run on a GPU when torch sees one, else on CPU under Triton's interpreter."""

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    collect_ignore_glob = ["test_*.py"]  # the triton extra is optional; the core works without it
elif not torch.cuda.is_available():
    # Triton decides interpreted-or-compiled when triton and each kernel are first imported.
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
