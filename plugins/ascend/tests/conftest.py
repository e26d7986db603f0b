"""Ascend plugin tests: the torch_npu stand-in and shared cases are imported from this folder."""

import sys
from pathlib import Path

TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)
