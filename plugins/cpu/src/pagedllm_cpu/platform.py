"""The CPU platform (provisional: reference attention until the CPU kernel lands)."""

from __future__ import annotations

import os

import torch

from pagedllm.plugin import AttentionBackend, AttentionSpec, Platform, ReferenceAttentionBackend


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    priority = 10
    supported_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    verified_on = "CPU (this machine)"

    def device_count(self) -> int:
        return 1

    def device_name(self, index: int = 0) -> str:
        return "cpu"

    def total_memory(self, index: int = 0) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def free_memory(self, index: int = 0) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        return ReferenceAttentionBackend(spec)
