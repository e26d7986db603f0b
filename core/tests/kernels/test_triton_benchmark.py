"""The kernel benchmark's measurements run end to end on the quick sizes (interpreter here, GPU elsewhere)."""

from __future__ import annotations

import torch

from pagedllm.kernels.triton import LaunchConfig
from pagedllm.kernels.triton.attention_backend import AttentionLaunchConfigs, TritonAttentionBackend
from pagedllm.kernels.triton.benchmark import QUICK_CASES, bench_attention


class Backend(TritonAttentionBackend):
    name = "bench-test"
    launch_configs = AttentionLaunchConfigs(LaunchConfig(32, 32), LaunchConfig(16, 32), LaunchConfig(2))


class Platform:
    def attention_backend(self, spec):  # type: ignore[no-untyped-def]
        return Backend(spec)


def test_decode_case_reports_time_and_kv_bandwidth(device) -> None:
    decode = next(c for c in QUICK_CASES if c.query_len == 1)
    m = bench_attention(decode, Platform(), torch.float32, device, interpreted=device.type == "cpu")
    assert m.ms > 0 and m.impl == "bench-test" and m.rate.endswith("GB/s (KV read)")
