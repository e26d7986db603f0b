"""TPU attention: the package's Pallas ragged paged attention kernel, torch-xla's as the fallback."""

from __future__ import annotations

from pagedllm.kernels.xla.attention_backend import XlaAttentionBackend


class TpuAttentionBackend(XlaAttentionBackend):
    """On a TPU the XLA-op attention is replaced per step by a Pallas kernel call (see kernels/)."""

    name = "tpu-pallas"
