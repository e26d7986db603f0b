"""The Triton path's attention backend: the shared paged attention and KV write kernels with Ascend configs."""

from __future__ import annotations

from functools import partial

from pagedllm.kernels.triton.attention_backend import TritonAttentionBackend
from pagedllm.kernels.triton.paged_attention import paged_attention

from pagedllm_ascend.kernels.launch_configs import ASCEND_ATTENTION


class AscendTritonAttentionBackend(TritonAttentionBackend):
    name = "ascend-triton"
    launch_configs = ASCEND_ATTENTION
    # triton-ascend has no default tl.dot input precision for fp16/bf16 operands: name IEEE (its
    # cube unit accumulates in fp32), as the fp32 path already does.
    attention_kernel = staticmethod(partial(paged_attention, dot_precision="ieee"))
