"""The Ascend attention backend: torch_npu's fused ops or the shared Triton kernels, over one KV layout.

``PAGEDLLM_ASCEND_ATTENTION`` (``settings.py``) picks the path; a layer the fused ops cannot run
(sliding window, logit soft-cap, float32) uses the Triton path even on the fused setting, which
is possible because both paths read and write ``[2, num_blocks, block_size, num_kv_heads,
head_size]`` caches.
"""

from __future__ import annotations

import logging

from pagedllm.plugin import AttentionBackend, AttentionSpec

from pagedllm_ascend.fused_attention import AscendFusedAttentionBackend, unsupported_reason
from pagedllm_ascend.settings import AttentionPath

logger = logging.getLogger(__name__)


def triton_attention_backend_class() -> type[AttentionBackend]:
    """The Triton path's backend class (imports triton, so only when the Triton path is used)."""
    from pagedllm_ascend.kernels.triton_attention import AscendTritonAttentionBackend

    return AscendTritonAttentionBackend


def select_attention_backend(spec: AttentionSpec, path: AttentionPath) -> AttentionBackend:
    """The backend for one layer on the chosen path."""
    if path == "fused":
        reason = unsupported_reason(spec)
        if reason is None:
            return AscendFusedAttentionBackend(spec)
        logger.info("ascend: %s is not covered by the fused attention ops; this layer uses the Triton path", reason)
    return triton_attention_backend_class()(spec)
