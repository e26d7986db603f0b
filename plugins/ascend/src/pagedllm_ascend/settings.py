"""The documented setting that picks the Ascend attention path: torch_npu's fused ops or the Triton kernels.

``PAGEDLLM_ASCEND_ATTENTION=fused`` (the default on an NPU) runs prefill and chunked prefill
through ``npu_fused_infer_attention_score``, decode through ``_npu_paged_attention``, KV writes
through ``npu_scatter_pa_kv_cache``, and registers torch_npu's RMSNorm/rotary/SwiGLU as ops.
``PAGEDLLM_ASCEND_ATTENTION=triton`` runs the core's portable Triton kernels, compiled by
triton-ascend, with Ascend launch configurations. Both paths share one KV cache layout. This
module imports nothing heavy, so detection may read it.
"""

from __future__ import annotations

import os
from typing import Literal

ENV_VAR = "PAGEDLLM_ASCEND_ATTENTION"
AttentionPath = Literal["fused", "triton"]
PATHS: tuple[AttentionPath, ...] = ("fused", "triton")


def requested_attention_path() -> AttentionPath | None:
    """The path the user named, or None when unset; an unknown value is a readable error."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in PATHS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(PATHS)}")
    return value  # type: ignore[return-value]


def attention_path() -> AttentionPath:
    """The path an NPU platform uses: the named one, else the fused torch_npu ops."""
    return requested_attention_path() or "fused"
