"""The fused attention path, run on the torch_npu stand-in (tests only), matches the core's reference backend.

What this checks without an NPU: the KV layout the scatter op writes is the one both attention
ops read, the TND query layout and cumulative query ends, per-sequence KV lengths, block tables,
GQA head counts and the decode/prefill split. What it cannot check: the real ops' numerics.
"""

from __future__ import annotations

import pytest
import torch
import torch_npu_standin
from fused_cases import CASES, run_against_reference, spec
from pagedllm.plugin import AttentionSpec
from pagedllm_ascend.fused_attention import AscendFusedAttentionBackend, unsupported_reason


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fused_backend_matches_reference_on_standin_ops(case, dtype) -> None:
    run_against_reference(AscendFusedAttentionBackend, case, dtype)


def test_decode_steps_use_paged_attention_and_prefills_use_fused_inference_attention(monkeypatch) -> None:
    calls: list[str] = []
    for name in ("_npu_paged_attention", "npu_fused_infer_attention_score"):
        original = getattr(torch_npu_standin, name)
        monkeypatch.setattr(torch_npu_standin, name,
                            lambda *a, _n=name, _f=original, **kw: (calls.append(_n), _f(*a, **kw))[1])
    decode, prefill = CASES[2], CASES[0]
    run_against_reference(AscendFusedAttentionBackend, decode, torch.bfloat16)
    assert calls == ["_npu_paged_attention"]
    run_against_reference(AscendFusedAttentionBackend, prefill, torch.bfloat16)
    assert calls == ["_npu_paged_attention", "npu_fused_infer_attention_score"]


def test_kv_cache_layout_is_shared_with_the_triton_path() -> None:
    backend = AscendFusedAttentionBackend(spec(torch.bfloat16), npu=torch_npu_standin)
    assert backend.kv_cache_shape(5, 16, 2, 64) == (2, 5, 16, 2, 64)


@pytest.mark.parametrize(("change", "reason"), [
    ({"sliding_window": 8}, "sliding window"),
    ({"logit_soft_cap": 30.0}, "logit soft-cap"),
    ({"dtype": torch.float32}, "dtype float32"),
])
def test_layers_the_fused_ops_cannot_run_are_refused_with_the_reason(change, reason) -> None:
    base = dict(num_heads=8, num_kv_heads=2, head_size=64, scale=0.125, dtype=torch.bfloat16, block_size=16)
    layer = AttentionSpec(**{**base, **change})
    assert reason in (unsupported_reason(layer) or "")
    with pytest.raises(ValueError, match="Triton path"):
        AscendFusedAttentionBackend(layer, npu=torch_npu_standin)
