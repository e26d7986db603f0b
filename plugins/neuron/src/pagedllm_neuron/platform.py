"""The Neuron platform (Trainium / Inferentia through torch-neuronx's XLA), and its XLA:CPU twin."""

from __future__ import annotations

import os
from typing import Any

from pagedllm.kernels.xla.attention_backend import XlaAttentionBackend
from pagedllm.kernels.xla.platform import XlaCpuTwinMode, XlaPlatform
from pagedllm.kernels.xla_twin import VERIFIED_ON

# Neuron's compiler keeps compiled graphs (NEFFs) here, so a restart skips recompilation.
CACHE_ENV = "NEURON_COMPILE_CACHE_URL"
DEFAULT_CACHE = os.path.expanduser("~/.cache/pagedllm/neuron-compile-cache")


class NeuronPlatform(XlaPlatform):
    """AWS Trainium/Inferentia: bf16, XLA-op paged attention, Neuron's bucketing rules.

    As vLLM's Neuron worker: sequence lengths (token counts) bucketed by powers of two up to the
    limit, block tables always padded to the most blocks a sequence can hold (max_model_len), so
    the graphs differ only by token count.
    """

    name = "neuron"
    verified_on = "AWS Neuron device (torch-neuronx)"
    attention_backend_class = XlaAttentionBackend
    min_token_bucket = 8
    token_padding_gap = 0
    fixed_block_table = True

    def __init__(self) -> None:
        super().__init__()
        self.set_compile_cache()

    def set_compile_cache(self) -> None:
        os.environ.setdefault(CACHE_ENV, DEFAULT_CACHE)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["compile cache"] = os.environ.get(CACHE_ENV, DEFAULT_CACHE)
        info["kernels"] = "XLA ops (NKI kernels would be faster; they cannot be built without AWS's toolchain)"
        return info


class NeuronXlaCpuPlatform(XlaCpuTwinMode, NeuronPlatform):
    """PAGEDLLM_XLA_CPU=1: the Neuron platform's buckets, warm-up and graphs on XLA:CPU in float32."""

    hardware = "Neuron device"
    verified_on = VERIFIED_ON.format(hardware="Neuron device")

    def set_compile_cache(self) -> None:
        return None  # no Neuron compiler on XLA:CPU

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["compile cache"] = "none (XLA:CPU twin)"
        return info
