"""The conformance suite's attention scenarios, run through the fused path on the torch_npu stand-in (tests only).

The suite's own case runner (block boundaries, chunked prefills, empty slots and padding, stale
NaN cache contents, long contexts, GQA/MQA shapes) drives the fused backend against the reference
at the suite's bf16/fp16 tolerances. The stand-in is not a device: this checks how the backend
calls the ops, not the ops. Sliding-window and soft-cap scenarios are left out: the fused path
hands those layers to the Triton kernels (covered under the interpreter).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pagedllm_conformance")

import torch_npu_standin  # noqa: E402
from pagedllm_ascend.fused_attention import AscendFusedAttentionBackend  # noqa: E402
from pagedllm_conformance.attention_cases import (  # noqa: E402
    CHECK_KINDS,
    QUICK_ANCHOR,
    QUICK_OTHERS,
    SCENARIO_NAMES,
    AttentionCase,
    run_attention_case,
)
from pagedllm_conformance.checks import CheckRecord, Conformance  # noqa: E402
from pagedllm_conformance.manifest import Manifest  # noqa: E402

SCENARIOS = [n for n in SCENARIO_NAMES if "window" not in n and "cap" not in n and n != "long_batch"]
SHAPES = [QUICK_ANCHOR, *QUICK_OTHERS]  # the quick grid: GQA 8/2, MQA 4/1, MHA 4/4, 6/2 at head size 80


class StandinFusedHost:
    """What run_attention_case asks of a platform: fused backends on CPU tensors, calling the stand-in ops."""

    def attention_backend(self, spec) -> AscendFusedAttentionBackend:  # type: ignore[no-untyped-def]
        return AscendFusedAttentionBackend(spec, npu=torch_npu_standin)

    def device(self) -> torch.device:
        return torch.device("cpu")

    def synchronize(self) -> None:
        return None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_conformance_attention_scenario_on_fused_path(scenario, dtype) -> None:
    shapes = SHAPES if dtype == torch.bfloat16 else SHAPES[:1]
    for shape in shapes:
        case = AttentionCase(scenario, shape, dtype)
        checks = {kind: Conformance(Manifest(), CheckRecord()) for kind in CHECK_KINDS}
        failures = run_attention_case(case, StandinFusedHost(), checks)
        assert failures == {kind: None for kind in CHECK_KINDS}, (case.id, failures)
