"""The Ascend platform's CPU twin: the Triton path's kernels under triton-ascend's interpreter.

``PAGEDLLM_TRITON_INTERPRET=1`` with triton-ascend installed makes the plugin offer it (never
chosen unless named: ``--platform ascend``). It proves the kernels and the Ascend launch
configurations compute the right thing; it says nothing about speed or about the fused ops.
"""

from __future__ import annotations

from typing import Any

from pagedllm.kernels.interpret import ENV_VAR
from pagedllm.kernels.triton.platform import TritonInterpreterMode

from pagedllm_ascend.kernels.triton_attention import AscendTritonAttentionBackend

VERIFIED_ON = "verified under triton-ascend's interpreter on CPU (no NPU)"


class AscendInterpreterPlatform(TritonInterpreterMode):
    """CPU device, gloo collectives, no graphs; the same kernels and launch configs as the NPU's Triton path."""

    name = "ascend"
    attention_backend_class = AscendTritonAttentionBackend
    verified_on = VERIFIED_ON

    def device_name(self, index: int = 0) -> str:
        return "cpu (triton-ascend interpreter)"

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["graphs"] = "skipped (interpreter mode has no NPU)"
        info["mode"] = f"triton-ascend's interpreter ({ENV_VAR}=1): kernels run on CPU tensors, no NPU used"
        info["launch"] = "Ascend configs (see pagedllm_ascend.kernels.launch_configs)"
        return info
