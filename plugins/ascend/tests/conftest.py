"""Ascend plugin tests: the torch_npu stand-in and shared cases are imported from this folder.

With triton-ascend installed (the ascend-interpret env) the Triton path's kernels run under its
interpreter: Triton decides interpreted-or-compiled when triton and each kernel are first imported.
"""

import importlib.metadata
import os
import sys
from pathlib import Path

TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

try:
    importlib.metadata.version("triton-ascend")
    os.environ["TRITON_INTERPRET"] = "1"
except importlib.metadata.PackageNotFoundError:
    pass
