"""Paged attention from XLA-friendly torch ops: static shapes, in-place scatter into the cache.

Each token gathers the key/value slots of its sequence's (padded) block table and attends with
a mask built from its position, so the graph's shapes depend only on the bucket (tokens x
blocks per sequence), never on the step's lengths. It materialises [tokens, context] scores:
the portable path both XLA backends share (Neuron's on hardware, the TPU fallback and both
XLA:CPU twins); the TPU platform uses its Pallas kernel on a TPU instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.attention.backend import AttentionBackend, AttentionBatch


@dataclass(slots=True)
class XlaAttentionMetadata:
    """Per-step tensors every layer shares, all with bucket shapes."""

    slot_mapping: torch.Tensor  # [T] int64, negative slots moved out of range (XLA scatter drops them)
    context_slots: torch.Tensor  # [T, B * block_size] int64: the flat cache slot of each key position
    visible: torch.Tensor  # [T, B * block_size] bool: causal mask (key position <= token position)
    distance: torch.Tensor  # [T, B * block_size] int64: token position - key position (sliding window)
    token_seq: torch.Tensor  # [T] int64: the sequence of each token (padding: 0)
    token_pos: torch.Tensor  # [T] int64: its position in that sequence (padding: 0)
    batch: AttentionBatch


def token_layout(query_start_loc: list[int], seq_lens: list[int], num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(sequence, position) of each token; padding tokens past the last query get (0, 0)."""
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    q_lens = np.diff(qsl)
    seq = np.zeros(num_tokens, dtype=np.int64)
    pos = np.zeros(num_tokens, dtype=np.int64)
    n = int(qsl[-1])
    seq[:n] = np.repeat(np.arange(q_lens.shape[0]), q_lens)
    ends = qsl[1:][seq[:n]]
    pos[:n] = np.asarray(seq_lens, dtype=np.int64)[seq[:n]] - (ends - np.arange(n))
    return seq, pos


class XlaAttentionBackend(AttentionBackend):
    """KV layout: [2, num_blocks * block_size, num_kv_heads, head_size] (keys, then values; flat slots)."""

    name = "xla-paged"

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        return (2, num_blocks * block_size, num_kv_heads, head_size)

    def build_metadata(self, batch: AttentionBatch) -> XlaAttentionMetadata:
        device = batch.slot_mapping.device
        T = batch.num_tokens
        bs = batch.block_size
        seq, pos = token_layout(batch.query_start_loc_cpu, batch.seq_lens_cpu, T)
        seq_t = torch.from_numpy(seq).to(device)
        pos_t = torch.from_numpy(pos).to(device)
        tables = batch.block_tables.long()[seq_t]  # [T, B]
        offsets = torch.arange(bs, dtype=torch.int64, device=device)
        context = (tables.unsqueeze(-1) * bs + offsets).reshape(T, -1)  # [T, B * bs]
        key_pos = torch.arange(context.shape[1], dtype=torch.int64, device=device)
        distance = pos_t.unsqueeze(1) - key_pos.unsqueeze(0)
        return XlaAttentionMetadata(batch.slot_mapping, context, distance >= 0, distance, seq_t, pos_t, batch)

    def write_kv(self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        """In-place scatter of this step's keys and values (one XLA scatter; out-of-range slots are dropped)."""
        num_slots = kv_cache.shape[1]
        slots = torch.where(slots < 0, torch.full_like(slots, num_slots), slots)
        kv_cache.index_copy_(1, slots, torch.stack((key, value)).to(kv_cache.dtype))

    def forward(
        self,
        query: torch.Tensor,  # [T, H, D]
        key: torch.Tensor,  # [T, KVH, D]
        value: torch.Tensor,  # [T, KVH, D]
        kv_cache: torch.Tensor,
        metadata: XlaAttentionMetadata,
    ) -> torch.Tensor:  # [T, H, D]
        spec = self.spec
        self.write_kv(kv_cache, key, value, metadata.slot_mapping)
        T, H, D = query.shape
        kvh = spec.num_kv_heads
        keys = kv_cache[0][metadata.context_slots].float()  # [T, L, KVH, D]
        values = kv_cache[1][metadata.context_slots].float()
        q = query.float().reshape(T, kvh, H // kvh, D)
        scores = torch.einsum("tkgd,tlkd->tkgl", q, keys) * spec.scale  # [T, KVH, G, L]
        if spec.logit_soft_cap is not None:
            scores = spec.logit_soft_cap * torch.tanh(scores / spec.logit_soft_cap)
        visible = metadata.visible
        if spec.sliding_window is not None:
            visible = visible & (metadata.distance < spec.sliding_window)
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        # Slots past a sequence's end may hold anything (a freed block's NaN): a zero weight times
        # NaN is NaN, so invisible values are zeroed too.
        values = values.masked_fill(~visible[:, :, None, None], 0.0)
        out = torch.einsum("tkgl,tlkd->tkgd", probs, values)
        return out.reshape(T, H, D).to(query.dtype)

    def read_kv(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return kv_cache[0][slots], kv_cache[1][slots]

    def copy_blocks(self, kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
        bs = self.spec.block_size
        pairs = src_to_dst.long()
        offsets = torch.arange(bs, dtype=torch.int64, device=pairs.device)
        src = (pairs[:, 0:1] * bs + offsets).reshape(-1)
        dst = (pairs[:, 1:2] * bs + offsets).reshape(-1)
        for kv_cache in kv_caches:
            kv_cache.index_copy_(1, dst, kv_cache[:, src])
