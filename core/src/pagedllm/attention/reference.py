"""The reference attention backend: plain torch, one sequence at a time, written to be obviously right.

It is the oracle every other backend is tested against, not a fast path.
"""

from __future__ import annotations

import torch

from pagedllm.attention.backend import AttentionBackend, AttentionBatch


class ReferenceAttentionBackend(AttentionBackend):
    """KV layout: [2, num_blocks, block_size, num_kv_heads, head_size] (keys, then values)."""

    name = "reference"

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int
    ) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def _flat(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, nb, bs, h, d = kv_cache.shape
        return kv_cache[0].view(nb * bs, h, d), kv_cache[1].view(nb * bs, h, d)

    def read_kv(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._flat(kv_cache)
        return k[slots], v[slots]

    def write_kv(
        self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        k_flat, v_flat = self._flat(kv_cache)
        for t in range(slot_mapping.shape[0]):
            slot = int(slot_mapping[t])
            if slot >= 0:
                k_flat[slot] = key[t]
                v_flat[slot] = value[t]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionBatch,
    ) -> torch.Tensor:
        spec = self.spec
        self.write_kv(kv_cache, key, value, metadata.slot_mapping)
        k_flat, v_flat = self._flat(kv_cache)
        out = torch.zeros_like(query)
        group = spec.num_heads // spec.num_kv_heads
        bs = metadata.block_size
        for i in range(metadata.num_seqs):
            q_start, q_end = metadata.query_start_loc_cpu[i], metadata.query_start_loc_cpu[i + 1]
            q_len, seq_len = q_end - q_start, metadata.seq_lens_cpu[i]
            if q_len == 0:
                continue
            table = metadata.block_tables[i].tolist()
            slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(seq_len)], dtype=torch.long)
            keys = k_flat[slots].float().repeat_interleave(group, dim=1)  # [seq_len, heads, d]
            values = v_flat[slots].float().repeat_interleave(group, dim=1)
            q = query[q_start:q_end].float()  # [q_len, heads, d]
            scores = torch.einsum("qhd,khd->hqk", q, keys) * spec.scale
            if spec.logit_soft_cap is not None:
                scores = spec.logit_soft_cap * torch.tanh(scores / spec.logit_soft_cap)
            q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
            k_pos = torch.arange(seq_len).unsqueeze(0)
            visible = k_pos <= q_pos
            if spec.sliding_window is not None:
                visible &= (q_pos - k_pos) < spec.sliding_window
            scores = scores.masked_fill(~visible, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, values).to(query.dtype)
        return out

    def copy_blocks(self, kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
        for kv_cache in kv_caches:
            for src, dst in src_to_dst.tolist():
                kv_cache[:, dst] = kv_cache[:, src]
