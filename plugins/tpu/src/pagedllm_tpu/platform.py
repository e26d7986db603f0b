"""The TPU platform on the shared XLA machinery, and its XLA:CPU twin (PAGEDLLM_XLA_CPU=1)."""

from __future__ import annotations

from typing import Any, ClassVar

from pagedllm.kernels.xla.attention_backend import XlaAttentionBackend
from pagedllm.kernels.xla.platform import XlaCpuTwinMode, XlaPlatform
from pagedllm.kernels.xla_twin import VERIFIED_ON
from pagedllm.plugin import AttentionBackend

from pagedllm_tpu.attention import TpuAttentionBackend


class TpuPlatform(XlaPlatform):
    """Google TPU: bf16, Pallas ragged paged attention, tokens padded to powers of two then a 512 gap."""

    name = "tpu"
    verified_on = "Google TPU (torch-xla, PJRT_DEVICE=TPU)"
    attention_backend_class: ClassVar[type[AttentionBackend]] = TpuAttentionBackend
    min_token_bucket = 16
    token_padding_gap = 512  # as vLLM's TPU runner: doubling up to 512 tokens, then steps of 512
    min_block_bucket = 8  # block tables of 8, 16, 32, ... blocks per sequence

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["kernels"] = "Pallas ragged paged attention (pagedllm_tpu.kernels), torch-xla's as fallback"
        return info


class TpuXlaCpuPlatform(XlaCpuTwinMode, TpuPlatform):
    """PAGEDLLM_XLA_CPU=1: the TPU platform's buckets, warm-up and graphs on XLA:CPU in float32.

    Attention runs the portable XLA-op path: Pallas TPU kernels cannot run on torch-xla's CPU
    device (they are verified separately, in jax's TPU-interpret mode).
    """

    hardware = "TPU"
    verified_on = VERIFIED_ON.format(hardware="TPU")
    attention_backend_class = XlaAttentionBackend
