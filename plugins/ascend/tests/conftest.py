"""Ascend plugin tests: the torch_npu stand-in and shared cases are imported from this folder.

With triton-ascend installed and no usable NPU (the ascend-interpret env) the Triton path's
kernels run under its interpreter: Triton decides interpreted-or-compiled when triton and each
kernel are first imported. On an NPU machine they are compiled for the NPU.
"""

import os
import sys
from pathlib import Path

TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

from pagedllm_ascend.hooks import detect, triton_ascend_version  # noqa: E402

if triton_ascend_version() is not None and not detect()[0]:
    os.environ["TRITON_INTERPRET"] = "1"
