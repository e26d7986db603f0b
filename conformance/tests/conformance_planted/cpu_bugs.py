"""Broken backends built on the CPU plugin: each wraps the CPU attention backend and plants one bug."""

from __future__ import annotations

import dataclasses
import math
import unittest
from typing import Any

import torch
from pagedllm.plugin import AttentionBackend, AttentionBatch, AttentionSpec, PluginRegistry, native_ops
from pagedllm_cpu import hooks as cpu_hooks
from pagedllm_cpu.platform import CpuPlatform


def register_cpu_ops(registry: PluginRegistry) -> None:
    """What the CPU plugin registers, so a planted backend differs from it only by its bug."""
    cpu_hooks.pagedllm_register(registry=registry)


class WrappedCpuAttention(AttentionBackend):
    """Delegates everything to the CPU plugin's backend; subclasses override one piece with a bug."""

    name = "planted"

    def __init__(self, spec: AttentionSpec, inner: AttentionBackend) -> None:
        super().__init__(spec)
        self.inner = inner

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        return self.inner.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)

    def allocate_kv_cache(self, num_blocks: int, device: torch.device | str) -> torch.Tensor:
        return self.inner.allocate_kv_cache(num_blocks, device)

    def transform(self, batch: AttentionBatch) -> AttentionBatch:
        return batch

    def build_metadata(self, batch: AttentionBatch) -> Any:
        return batch, self.inner.build_metadata(self.transform(batch))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                metadata: Any) -> torch.Tensor:
        _, inner_meta = metadata
        return self.inner.forward(query, key, value, kv_cache, inner_meta)

    def read_kv(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.read_kv(kv_cache, slots)

    def copy_blocks(self, kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
        self.inner.copy_blocks(kv_caches, src_to_dst)


class SlotOffByOne(WrappedCpuAttention):
    def transform(self, batch: AttentionBatch) -> AttentionBatch:
        slots = batch.slot_mapping
        return dataclasses.replace(batch, slot_mapping=torch.where(slots >= 0, slots + 1, slots))


class OwnKernel(WrappedCpuAttention):
    """The CPU plugin writes the cache; attention is recomputed here from read_kv, with a knob to break."""

    def kv_head_of(self) -> torch.Tensor:  # [num_heads] kv head read by each query head
        s = self.spec
        return torch.arange(s.num_heads) // (s.num_heads // s.num_kv_heads)

    def readable_len(self, seq_len: int, block_size: int) -> int:
        return seq_len

    def window_slack(self) -> int:
        return 0

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                metadata: Any) -> torch.Tensor:
        batch, inner_meta = metadata
        self.inner.forward(query, key, value, kv_cache, inner_meta)  # the write path stays the CPU plugin's
        s, bs = self.spec, batch.block_size
        out = torch.zeros_like(query)
        heads = self.kv_head_of()
        for i in range(batch.num_seqs):
            q0, q1 = batch.query_start_loc_cpu[i], batch.query_start_loc_cpu[i + 1]
            seq_len = batch.seq_lens_cpu[i]
            if q1 == q0:
                continue
            n = self.readable_len(seq_len, bs)
            table = batch.block_tables[i].tolist()
            slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(n)], dtype=torch.long)
            keys, values = self.inner.read_kv(kv_cache, slots)  # [n, H_kv, D]
            keys, values = keys.float()[:, heads], values.float()[:, heads]  # [n, H, D]
            scores = torch.einsum("qhd,khd->hqk", query[q0:q1].float(), keys) * s.scale
            if s.logit_soft_cap is not None:
                scores = s.logit_soft_cap * torch.tanh(scores / s.logit_soft_cap)
            q_pos = torch.arange(seq_len - (q1 - q0), seq_len).unsqueeze(1)
            k_pos = torch.arange(n).unsqueeze(0)
            visible = k_pos <= q_pos
            if s.sliding_window is not None:
                visible &= (q_pos - k_pos) < s.sliding_window + self.window_slack()
            probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
            out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, values).to(query.dtype)
        return out


class IgnoreLastBlock(OwnKernel):
    def readable_len(self, seq_len: int, block_size: int) -> int:
        return min(seq_len, (math.ceil(seq_len / block_size) - 1) * block_size)  # loop bound off by one block


class GqaModulo(OwnKernel):
    def kv_head_of(self) -> torch.Tensor:
        return torch.arange(self.spec.num_heads) % self.spec.num_kv_heads


class WindowOffByOne(OwnKernel):
    def window_slack(self) -> int:
        return 1


class CopyFirstLayerOnly(WrappedCpuAttention):
    def copy_blocks(self, kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
        self.inner.copy_blocks(kv_caches[:1], src_to_dst)


def _stale_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    summed = x + residual
    return native_ops.rms_norm(summed, weight, eps), residual


def register_stale_residual(registry: PluginRegistry) -> None:
    register_cpu_ops(registry)
    registry.override_op("fused_add_rms_norm", _stale_residual, owner="planted_residual")


def _eps_outside_sqrt(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf / (xf.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight.float()).to(x.dtype)


def register_eps_outside_sqrt(registry: PluginRegistry) -> None:
    """rms_norm dividing by sqrt(mean(x^2)) + eps: off by < 1e-6 on ordinary rows, by tens of percent on
    rows whose mean square is near eps (the bug model parity caught and the ops group did not)."""
    register_cpu_ops(registry)
    registry.override_op("rms_norm", _eps_outside_sqrt, owner="planted_eps")


def _platform(entry_point: str, backend: type[WrappedCpuAttention], drop_soft_cap: bool = False) -> type[CpuPlatform]:
    class Planted(CpuPlatform):
        name = entry_point
        verified_on = "conformance self-test (planted bug on the CPU plugin)"

        def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
            inner_spec = dataclasses.replace(spec, logit_soft_cap=None) if drop_soft_cap else spec
            return backend(spec, CpuPlatform.attention_backend(self, inner_spec))

    Planted.__name__ = Planted.__qualname__ = f"Planted_{entry_point}"
    return Planted


SoundWrappedPlatform = _platform("planted_sound", WrappedCpuAttention)
SlotOffByOnePlatform = _platform("planted_slot", SlotOffByOne)
IgnoreLastBlockPlatform = _platform("planted_lastblock", IgnoreLastBlock)
GqaModuloPlatform = _platform("planted_gqa", GqaModulo)
DroppedSoftCapPlatform = _platform("planted_softcap", WrappedCpuAttention, drop_soft_cap=True)
WindowOffByOnePlatform = _platform("planted_window", WindowOffByOne)
CopyFirstLayerOnlyPlatform = _platform("planted_copy", CopyFirstLayerOnly)
StaleResidualPlatform = _platform("planted_residual", WrappedCpuAttention)
EpsOutsideSqrtPlatform = _platform("planted_eps", WrappedCpuAttention)


class SkipsHeadSize80(WrappedCpuAttention):
    """A backend that skips (instead of failing) where it has no kernel: the suite must not accept that."""

    def __init__(self, spec: AttentionSpec, inner: AttentionBackend) -> None:
        if spec.head_size == 80:
            raise unittest.SkipTest("no kernel for head size 80")
        super().__init__(spec, inner)


SkippyPlatform = _platform("planted_skippy", SkipsHeadSize80)
SkippyDeclaredPlatform = _platform("planted_skippy_declared", SkipsHeadSize80)
