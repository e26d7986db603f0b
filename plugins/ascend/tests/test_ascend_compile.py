"""Every Triton kernel the Ascend Triton path launches compiles for Ascend910B4 through triton-ascend's front end.

Runs ``python -m pagedllm_ascend.kernels.ascend_compile`` in a fresh process without
TRITON_INTERPRET; without CANN it stops at the binary stage (bishengir), so the check is that each
launch left its last CANN-free stage, ``.ttadapter`` (linalg/HIVM MLIR), naming its kernel.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    importlib.metadata.version("triton-ascend")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("needs triton-ascend (tox -e ascend-interpret)", allow_module_level=True)

LAUNCHED_KERNELS = {"kv_write_kernel", "paged_attention_kernel", "rms_norm_kernel", "rotary_kernel", "act_and_mul_kernel"}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ascend-compile")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PAGEDLLM_TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "-m", "pagedllm_ascend.kernels.ascend_compile", "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def test_every_launch_reaches_the_last_stage_without_cann(report) -> None:
    assert len(report) == 3 * 12  # 12 launches (KV write, 6 attention variants, 5 ops) x bf16/fp16/fp32
    for case in report:
        ttadapter = Path(case["stages"]["ttadapter"])
        assert ttadapter.stat().st_size > 0 and Path(case["stages"]["ttir"]).stat().st_size > 0, case["case"]
        assert f"func.func @{case['kernels'][0]}" in ttadapter.read_text(), case["case"]
        # Stopped at the binary step for want of CANN, or (with CANN) went all the way.
        assert case["stopped_at"] is None or "ASCEND_HOME_PATH" in case["stopped_at"] or "bishengir" in case["stopped_at"], case


def test_compiled_kernels_are_every_kernel_the_backend_launches(report) -> None:
    import pagedllm.kernels.triton.activation as activation
    import pagedllm.kernels.triton.kv_write as kv_write
    import pagedllm.kernels.triton.paged_attention as paged_attention
    import pagedllm.kernels.triton.rms_norm as rms_norm
    import pagedllm.kernels.triton.rotary as rotary

    compiled = {kernel for case in report for kernel in case["kernels"]}
    # The kernels defined by the modules the backend and its ops launch from (helpers are inlined).
    defined = {name for module in (activation, kv_write, paged_attention, rms_norm, rotary)
               for name in vars(module) if name.endswith("_kernel")}
    assert compiled == defined == LAUNCHED_KERNELS
