"""The fused Ascend attention backend: torch_npu's paged attention ops over the shared KV layout.

KV layout, one tensor per layer: ``[2, num_blocks, block_size, num_kv_heads, head_size]`` (keys,
then values), the layout of the Triton path too. Each half is what ``npu_scatter_pa_kv_cache``
(cache_mode "Norm") writes and ``_npu_paged_attention`` reads, ``[num_blocks, block_size,
num_kv_heads, head_size]``; ``npu_fused_infer_attention_score`` reads the same memory as its
"BnBsH" paged layout ``[num_blocks, block_size, num_kv_heads * head_size]``.

- KV writes: ``npu_scatter_pa_kv_cache(key, value, key_cache, value_cache, slot_mapping)``.
- Decode steps (every sequence has exactly one new token): ``_npu_paged_attention`` with the
  block table and the sequences' context lengths (a host int32 tensor, as the op takes it).
- Everything else (prefill, chunked prefill, mixed batches): ``npu_fused_infer_attention_score``
  with ``input_layout="TND"`` (tokens of all sequences concatenated), cumulative query ends in
  ``actual_seq_lengths``, per-sequence KV lengths in ``actual_seq_lengths_kv``, the block table,
  and ``sparse_mode=3`` (causal aligned to the bottom-right corner: the queries are the last
  q_len of seq_len tokens) with the op's compressed 2048 x 2048 causal mask.

Sliding windows, logit soft-caps and float32 are outside what these ops do here; such layers use
the Triton path, which shares this layout (see ``attention.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from pagedllm.plugin import AttentionBackend, AttentionBatch, AttentionSpec

FUSED_DTYPES = (torch.float16, torch.bfloat16)  # what the fused attention ops take
CAUSAL_MASK_SIZE = 2048  # sparse_mode 2/3/4 take this optimised mask, whatever the sequence lengths


def unsupported_reason(spec: AttentionSpec) -> str | None:
    """Why the fused ops cannot run this layer, or None when they can."""
    if spec.sliding_window is not None:
        return "sliding window"
    if spec.logit_soft_cap is not None:
        return "logit soft-cap"
    if spec.dtype not in FUSED_DTYPES:
        return f"dtype {str(spec.dtype).removeprefix('torch.')} (fused ops take float16/bfloat16)"
    return None


@dataclass(slots=True)
class FusedMetadata:
    """One step's batch in the form the torch_npu ops take."""

    num_tokens: int  # real (unpadded) query tokens; padding rows come after them
    decode_only: bool  # every sequence has exactly one query token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, device
    slot_mapping: torch.Tensor  # [num_tokens] int32, device
    context_lens: torch.Tensor  # [num_seqs] int32, host: _npu_paged_attention's context_lens
    actual_seq_lengths: list[int]  # TND: cumulative query ends, one per sequence
    actual_seq_lengths_kv: list[int]  # per-sequence KV lengths


class AscendFusedAttentionBackend(AttentionBackend):
    """Writes keys/values with the scatter op, then attends with paged or fused inference attention."""

    name = "ascend-fused"

    def __init__(self, spec: AttentionSpec, npu: ModuleType | None = None) -> None:
        super().__init__(spec)
        reason = unsupported_reason(spec)
        if reason is not None:
            raise ValueError(f"the fused Ascend attention ops do not support {reason}; use the Triton path")
        if npu is None:
            from pagedllm_ascend.npu import import_torch_npu

            npu = import_torch_npu()
        self.npu = npu  # torch_npu (tests pass their stand-in of it)
        self._causal_mask: torch.Tensor | None = None

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int
    ) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def build_metadata(self, batch: AttentionBatch) -> FusedMetadata:
        if batch.block_size != self.spec.block_size:
            raise ValueError(f"batch block_size {batch.block_size} != layer block_size {self.spec.block_size}")
        starts = batch.query_start_loc_cpu
        num_tokens = starts[-1]
        query_lens = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        return FusedMetadata(
            num_tokens=num_tokens,
            decode_only=bool(query_lens) and all(q == 1 for q in query_lens),
            block_tables=batch.block_tables.to(torch.int32),
            slot_mapping=batch.slot_mapping[:num_tokens].to(torch.int32),
            context_lens=torch.tensor(batch.seq_lens_cpu, dtype=torch.int32),
            actual_seq_lengths=list(starts[1:]),
            actual_seq_lengths_kv=list(batch.seq_lens_cpu),
        )

    def causal_mask(self, device: torch.device) -> torch.Tensor:
        """The op's compressed causal mask: True above the diagonal (masked out)."""
        if self._causal_mask is None or self._causal_mask.device != device:
            ones = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=device)
            self._causal_mask = torch.triu(ones, diagonal=1)
        return self._causal_mask

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_size]
        metadata: FusedMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
        spec, npu, n = self.spec, self.npu, metadata.num_tokens
        key_cache, value_cache = kv_cache[0], kv_cache[1]  # [num_blocks, block_size, num_kv_heads, head_size]
        output = torch.zeros_like(query)  # padding rows stay zero
        if n == 0:
            return output
        npu.npu_scatter_pa_kv_cache(key[:n].contiguous(), value[:n].contiguous(), key_cache, value_cache,
                                    metadata.slot_mapping)
        q = query[:n].contiguous()
        if metadata.decode_only:
            npu._npu_paged_attention(
                query=q, key_cache=key_cache, value_cache=value_cache,
                num_kv_heads=spec.num_kv_heads, num_heads=spec.num_heads, scale_value=spec.scale,
                block_table=metadata.block_tables, context_lens=metadata.context_lens, out=output[:n],
            )
            return output
        num_blocks, block_size = key_cache.shape[:2]
        attn, _ = npu.npu_fused_infer_attention_score(
            q, key_cache.view(num_blocks, block_size, -1), value_cache.view(num_blocks, block_size, -1),
            atten_mask=self.causal_mask(query.device), block_table=metadata.block_tables,
            actual_seq_lengths=metadata.actual_seq_lengths, actual_seq_lengths_kv=metadata.actual_seq_lengths_kv,
            num_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads, scale=spec.scale,
            input_layout="TND", sparse_mode=3, block_size=block_size,
        )
        output[:n] = attn
        return output

    def read_kv(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, num_blocks, block_size, heads, head_size = kv_cache.shape
        flat = kv_cache.view(2, num_blocks * block_size, heads, head_size)
        return flat[0, slots], flat[1, slots]

    def copy_blocks(self, kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
        if src_to_dst.numel() == 0:
            return
        pairs = src_to_dst.to(device=kv_caches[0].device, dtype=torch.long)
        for kv_cache in kv_caches:
            kv_cache[:, pairs[:, 1]] = kv_cache[:, pairs[:, 0]]
