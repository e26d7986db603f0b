"""CpuAttentionBackend: vectorised paged attention in torch, with an optional IPEX fast path.

KV layout: ``[2, num_blocks, num_kv_heads, block_size, head_size]`` (keys, then values). Each
``kv_cache[i]`` is the ``[num_blocks, num_kv_heads, block_size, head_size]`` tensor IPEX's
paged kernels expect, and one (block, kv head) pair is a contiguous ``block_size * head_size``
run, so a sequence's keys gather with one ``index_select`` straight into ``[heads, len, dim]``.

Decodes (query length 1) run batched: keys/values are gathered through the block tables into a
padded ``[n, H_kv, max_len, D]`` workspace, a few sequences at a time so the workspace stays
in cache, and GQA folds the query heads into ``[n, H_kv, group, D]`` (no K/V repeat). Prefills
and chunked prefills run one sequence at a time through ``scaled_dot_product_attention``; that
loop is per sequence, never per token. Everything index-shaped is computed once per step in
``build_metadata`` and shared by all layers.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pagedllm.plugin import AttentionBackend, AttentionBatch, AttentionSpec
from pagedllm_cpu.kernels.clib import KV_CACHE_DTYPES

# Decode gathers K and V for a group of sequences into one workspace of about this size, so the
# workspace is still in cache when SDPA reads it back. Measured on the shared, oversubscribed
# 2-core Xeon (batch 64 x 512 tokens, SmolLM2 heads, ms per layer): 1 thread 0.5 MiB 32, 1 MiB 39,
# 4 MiB 44, whole batch at once 120; 2 threads 1 MiB 467, 4 MiB 226, 16 MiB 284, 64 MiB 314
# (each chunk costs a few parallel regions, which hurts when threads get descheduled).
DECODE_CHUNK_BYTES = 4 << 20

# Sequences with at most this many query tokens in a step go to the C kernel (kernels/cpu_ops.c),
# which reads K/V straight from the paged cache, one call per layer for all of them; longer
# prefills use SDPA, whose blocked matmuls win once a sequence has many queries. Measured on the
# Intel Xeon with AMX, one layer, 2 threads, fp32, C kernel (query groups in registers) vs SDPA
# per sequence: SmolLM2 heads (9 x 64, 3 KV heads), 64 prefills of 64 tokens 3.4 vs 6.4 ms; 4 of
# 128: 0.59 vs 0.89 ms; one of 512: 2.0 vs 2.3, of 1024: 7.6 vs 6.4. With 128-feature heads the
# C kernel still wins at 64 tokens (1.0 vs 1.5 ms, 4 sequences) and loses by 256 (14.1 vs 12.3).
KERNEL_MAX_QUERIES = 128


@dataclass(slots=True)
class DecodeChunk:
    """A group of decode sequences gathered and attended together."""

    start: int  # rows [start, end) of the decode batch
    end: int
    kv_rows: torch.Tensor  # [2 * n * H_kv * num_blocks] rows of the [2*nb*H_kv, bs*D] cache view
    max_len: int  # padded key length: num_blocks * block_size
    last_pos: torch.Tensor  # [n, 1] int64 position of each query (seq_len - 1)
    # Rows of the workspace viewed as [2 * n * H_kv * max_len, D] that lie past a sequence's end:
    # never-written slots may hold anything, even NaN, and 0 * NaN would leak through softmax.
    pad_rows: torch.Tensor | None
    visible: dict[int | None, torch.Tensor] = field(default_factory=dict)  # window -> [n, 1, 1, max_len]
    biases: dict[tuple[int | None, torch.dtype], torch.Tensor] = field(default_factory=dict)

    def visible_for(self, window: int | None) -> torch.Tensor:
        """Which padded key positions each query sees; built once per window per step."""
        mask = self.visible.get(window)
        if mask is None:
            pos = torch.arange(self.max_len, dtype=torch.long).view(1, -1)
            mask = self.visible[window] = _visible(self.last_pos, pos, window).view(
                self.end - self.start, 1, 1, -1
            )
        return mask

    def bias_for(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """visible_for as an additive 0 / -inf mask: SDPA would convert a bool mask every layer."""
        bias = self.biases.get((window, dtype))
        if bias is None:
            bias = self.biases[(window, dtype)] = _additive(self.visible_for(window), dtype)
        return bias


@dataclass(slots=True)
class PrefillSeq:
    """One sequence with more than one query token (a prefill or a chunk of one)."""

    q_start: int
    q_end: int
    context_len: int  # tokens already in the cache before this step
    seq_len: int
    block_table: torch.Tensor  # [num_blocks_needed] int64
    visible: dict[int | None, torch.Tensor] = field(default_factory=dict)  # window -> [q_len, seq_len] bool
    biases: dict[tuple[int | None, torch.dtype], torch.Tensor] = field(default_factory=dict)
    kv_rows: dict[int, torch.Tensor] = field(default_factory=dict)  # num_kv_heads -> gather rows


@dataclass(slots=True)
class KernelPlan:
    """The sequences the C kernel attends in one call (decodes, short prefills) and the rest.

    Index tensors are int32, the model runner's own dtypes: a captured decode step's plan points
    at the runner's persistent buffers, so a replay reads whatever they hold.
    """

    q_starts: torch.Tensor  # [n] int32
    q_lens: torch.Tensor  # [n] int32
    seq_lens: torch.Tensor  # [n] int32
    block_tables: torch.Tensor  # [n, max_blocks] int32 contiguous
    torch_prefills: list[PrefillSeq]  # longer prefills: SDPA, one sequence at a time

    @classmethod
    def for_capture(cls, batch: AttentionBatch) -> KernelPlan:
        """Every sequence one decode token, all indices read from the batch's device tensors."""
        n = batch.seq_lens.shape[0]
        return cls(
            batch.query_start_loc[:n].to(torch.int32),
            torch.ones(n, dtype=torch.int32),
            batch.seq_lens.to(torch.int32),
            batch.block_tables.to(torch.int32).contiguous(),
            [],
        )


@dataclass(slots=True)
class CpuAttentionMetadata:
    """What forward needs, computed once per step; per-shape pieces are filled on first use."""

    batch: AttentionBatch
    num_actual_tokens: int  # tokens that belong to a sequence; the rest are padding
    # KV write: only tokens with slot >= 0.
    write_tokens: torch.Tensor | None  # [n_write] int64 token indices; None = all tokens
    write_slots: torch.Tensor  # [n_write] int64
    write_blocks: torch.Tensor  # [n_write] int64
    write_offsets: torch.Tensor  # [n_write] int64
    # Decodes: sequences with exactly one query token.
    decode_tokens: torch.Tensor  # [n_decode] int64 token index of each decode
    decode_seq_lens: list[int]
    decode_block_tables: torch.Tensor  # [n_decode, max_blocks] int64 contiguous
    slots: torch.Tensor  # [num_tokens] int64 slot of every token, -1 = none (the C KV write)
    prefills: list[PrefillSeq]
    kernel_plan: KernelPlan | None = None
    decode_chunks: dict[tuple[int, int], list[DecodeChunk]] = field(default_factory=dict)
    ipex_inputs: tuple[torch.Tensor, torch.Tensor] | None = None
    ipex_inputs_prefill: tuple[torch.Tensor, ...] | None = None

    @property
    def num_decodes(self) -> int:
        return len(self.decode_seq_lens)

    def plan_for_kernel(self) -> KernelPlan:
        """Which sequences the C kernel takes; built once per step on first use."""
        if self.kernel_plan is None:
            batch = self.batch
            qsl, lens = batch.query_start_loc_cpu, batch.seq_lens_cpu
            rows, starts, q_lens, seq_lens = [], [], [], []
            for i, seq_len in enumerate(lens):
                q_len = qsl[i + 1] - qsl[i]
                if 0 < q_len <= KERNEL_MAX_QUERIES:
                    rows.append(i)
                    starts.append(qsl[i])
                    q_lens.append(q_len)
                    seq_lens.append(seq_len)
            width = _blocks_for(max(seq_lens, default=0), batch.block_size)
            tables = batch.block_tables.index_select(0, torch.tensor(rows, dtype=torch.long))
            self.kernel_plan = KernelPlan(
                torch.tensor(starts, dtype=torch.int32),
                torch.tensor(q_lens, dtype=torch.int32),
                torch.tensor(seq_lens, dtype=torch.int32),
                tables[:, :width].to(torch.int32).contiguous(),
                [p for p in self.prefills if p.q_end - p.q_start > KERNEL_MAX_QUERIES],
            )
        return self.kernel_plan

    def ipex_prefill_inputs(self) -> tuple[torch.Tensor, ...]:
        """Prefill token indices, cu_seqlens_q, cu_seqlens_kv, block tables (int32), for IPEX varlen."""
        if self.ipex_inputs_prefill is None:
            tokens = torch.cat([torch.arange(p.q_start, p.q_end, dtype=torch.long) for p in self.prefills])
            cu_q = torch.tensor([0] + [p.q_end - p.q_start for p in self.prefills], dtype=torch.int32).cumsum(
                0
            )
            cu_kv = torch.tensor([0] + [p.seq_len for p in self.prefills], dtype=torch.int32).cumsum(0)
            width = max(p.block_table.numel() for p in self.prefills)
            tables = torch.zeros((len(self.prefills), width), dtype=torch.int32)
            for i, p in enumerate(self.prefills):
                tables[i, : p.block_table.numel()] = p.block_table
            self.ipex_inputs_prefill = (tokens, cu_q.to(torch.int32), cu_kv.to(torch.int32), tables)
        return self.ipex_inputs_prefill

    def ipex_decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode block tables [n, blocks] and context lengths [n], both int32, for IPEX."""
        if self.ipex_inputs is None:
            self.ipex_inputs = (
                self.decode_block_tables.to(torch.int32).contiguous(),
                torch.tensor(self.decode_seq_lens, dtype=torch.int32),
            )
        return self.ipex_inputs


def _blocks_for(length: int, block_size: int) -> int:
    return -(-length // block_size)


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Key k visible to query q iff 0 <= q - k < window (no window: q >= k)."""
    diff = q_pos - k_pos
    vis = diff >= 0
    if window is not None:
        vis &= diff < window
    return vis


class CpuAttentionBackend(AttentionBackend):
    """Paged attention for CPUs; see the module docstring for the layout and the algorithm."""

    name = "cpu-torch"

    def __init__(self, spec: AttentionSpec, ipex: Any = None, kernels: Any = None) -> None:
        super().__init__(spec)
        if spec.sliding_window is not None and spec.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {spec.sliding_window}")
        # ipex: an IpexKernels object (kernels/ipex.py) when the IPEX fast path is selected.
        self.ipex = ipex
        if ipex is not None:
            self.name = "cpu-ipex"
        # kernels: the C kernels (kernels/gguf.py) for fp32 KV writes and decodes, when built.
        self.kernels = kernels if ipex is None else None

    # --- layout ----------------------------------------------------------------------------
    def supports_kv_cache_dtype(self, dtype: torch.dtype) -> bool:
        """A bf16 cache beside an fp32 model: written rounded to nearest even, widened to fp32 as it
        is read (the C kernels, or torch's casts). Not through IPEX, whose kernels take one dtype."""
        return dtype == self.spec.dtype or (
            self.ipex is None and self.spec.dtype == torch.float32 and dtype == torch.bfloat16
        )

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int
    ) -> tuple[int, ...]:
        return (2, num_blocks, num_kv_heads, block_size, head_size)

    def allocate_kv_cache(self, num_blocks: int, device: torch.device | str) -> torch.Tensor:
        """Zeros from an anonymous mapping: the kernel hands out zeroed pages on first write, so
        startup does not fault in and clear the whole cache (torch.zeros of the default 4 GiB took
        9 s here, most of a cold start) and memory is committed only as blocks are used."""
        s = self.spec
        shape = self.kv_cache_shape(num_blocks, s.block_size, s.num_kv_heads, s.head_size)
        nbytes = math.prod(shape) * s.cache_dtype.itemsize
        if torch.device(device).type != "cpu" or nbytes == 0:
            return super().allocate_kv_cache(num_blocks, device)
        # the tensor holds a reference to the mapping, which is unmapped when the tensor dies
        return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=s.cache_dtype).view(shape)

    def read_kv(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bs = kv_cache.shape[3]
        slots = slots.to(torch.long)
        blocks, offsets = slots // bs, slots % bs
        # Advanced indices around a slice put the indexed dim first: [n, H_kv, D].
        return kv_cache[0][blocks, :, offsets], kv_cache[1][blocks, :, offsets]

    def copy_blocks(self, kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
        if src_to_dst.numel() == 0:
            return
        pairs = src_to_dst.to(device=kv_caches[0].device, dtype=torch.long).view(-1, 2)
        src, dst = pairs[:, 0], pairs[:, 1]
        for kv_cache in kv_caches:
            kv_cache.index_copy_(1, dst, kv_cache.index_select(1, src))

    # --- per-step metadata -----------------------------------------------------------------
    def build_metadata(self, batch: AttentionBatch) -> CpuAttentionMetadata:
        bs = batch.block_size
        qsl = batch.query_start_loc_cpu
        slot_mapping = batch.slot_mapping.to(torch.long)
        valid = slot_mapping >= 0
        if bool(valid.all()):
            write_tokens, write_slots = None, slot_mapping
        else:
            write_tokens = valid.nonzero().squeeze(1)
            write_slots = slot_mapping[write_tokens]

        decode_rows: list[int] = []
        decode_tokens: list[int] = []
        prefills: list[PrefillSeq] = []
        tables = batch.block_tables.to(torch.long)
        for i, seq_len in enumerate(batch.seq_lens_cpu):
            q_len = qsl[i + 1] - qsl[i]
            if q_len == 0:
                continue
            if q_len == 1:
                decode_rows.append(i)
                decode_tokens.append(qsl[i])
            else:
                prefills.append(
                    PrefillSeq(
                        q_start=qsl[i],
                        q_end=qsl[i + 1],
                        context_len=seq_len - q_len,
                        seq_len=seq_len,
                        block_table=tables[i, : _blocks_for(seq_len, bs)],
                    )
                )
        # Longest first: decode chunks then group similar lengths and pad little. Outputs go back
        # by token index, so the order is free.
        order = sorted(range(len(decode_rows)), key=lambda j: -batch.seq_lens_cpu[decode_rows[j]])
        decode_rows = [decode_rows[j] for j in order]
        decode_tokens = [decode_tokens[j] for j in order]
        decode_seq_lens = [batch.seq_lens_cpu[i] for i in decode_rows]
        max_blocks = _blocks_for(max(decode_seq_lens, default=0), bs)
        rows = torch.tensor(decode_rows, dtype=torch.long)
        return CpuAttentionMetadata(
            batch=batch,
            num_actual_tokens=qsl[-1] if qsl else 0,
            write_tokens=write_tokens,
            write_slots=write_slots,
            write_blocks=write_slots // bs,
            write_offsets=write_slots % bs,
            decode_tokens=torch.tensor(decode_tokens, dtype=torch.long),
            decode_seq_lens=decode_seq_lens,
            decode_block_tables=tables.index_select(0, rows)[:, :max_blocks].contiguous(),
            slots=slot_mapping.contiguous(),
            prefills=prefills,
        )

    # --- forward ---------------------------------------------------------------------------
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,  # [2, num_blocks, num_kv_heads, block_size, head_size]
        metadata: CpuAttentionMetadata | AttentionBatch,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
        if isinstance(metadata, AttentionBatch):
            metadata = self.build_metadata(metadata)
        kernels = self.kernels if self._kernel_layout(query, key, value, kv_cache) else None
        if kernels is not None:
            kernels.write_kv(key, value, kv_cache, metadata.slots)
        else:
            self._write_kv(key, value, kv_cache, metadata)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        if metadata.num_actual_tokens < query.shape[0]:
            out[metadata.num_actual_tokens :].zero_()
        if kernels is not None:
            plan = metadata.plan_for_kernel()
            if plan.q_starts.numel():
                s = self.spec
                kernels.paged_attention(
                    query,
                    kv_cache,
                    out,
                    plan.q_starts,
                    plan.q_lens,
                    plan.seq_lens,
                    plan.block_tables,
                    s.scale,
                    s.sliding_window,
                    s.logit_soft_cap,
                )
            for seq in plan.torch_prefills:
                self._prefill(seq, query, key, value, kv_cache, out)
            return out
        if metadata.num_decodes:
            if self.ipex is not None and self.ipex.supports(self.spec):
                self.ipex.decode(self.spec, query, kv_cache, metadata, out)
            else:
                self._decode(query, kv_cache, metadata, out)
        if metadata.prefills and self.ipex is not None and self.ipex.supports(self.spec):
            self.ipex.prefill(self.spec, query, kv_cache, metadata, out)
        else:
            # Per sequence (lengths differ). Measured, 1 thread, SmolLM2 heads: 8 prefills x 256
            # tokens 46 ms this way vs 108 ms for one batched SDPA over the same equal-length batch.
            for seq in metadata.prefills:
                self._prefill(seq, query, key, value, kv_cache, out)
        return out

    @staticmethod
    def _kernel_layout(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor
    ) -> bool:
        """fp32 queries, keys and values with each token's heads contiguous, a contiguous fp32 or bf16 cache:
        what the C kernels take."""
        return (
            kv_cache.dtype in KV_CACHE_DTYPES
            and kv_cache.is_contiguous()
            and all(
                t.dtype == torch.float32 and t.stride(2) == 1 and t.stride(1) == t.shape[2]
                for t in (query, key, value)
            )
        )

    def _write_kv(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, meta: CpuAttentionMetadata
    ) -> None:
        if meta.write_slots.numel() == 0:
            return
        if meta.write_tokens is not None:
            key, value = key.index_select(0, meta.write_tokens), value.index_select(0, meta.write_tokens)
        if self.ipex is not None:
            self.ipex.write_kv(key, value, kv_cache, meta.write_slots)
            return
        # kv_cache[i][block, :, offset] = token's [H_kv, D]; one index_put per tensor.
        kv_cache[0][meta.write_blocks, :, meta.write_offsets] = key.to(kv_cache.dtype)
        kv_cache[1][meta.write_blocks, :, meta.write_offsets] = value.to(kv_cache.dtype)

    def _decode(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: CpuAttentionMetadata, out: torch.Tensor
    ) -> None:
        _, nb, h, bs, d = kv_cache.shape
        g = self.spec.num_heads // h
        chunks = self._decode_chunks(kv_cache, meta)
        q = query.index_select(0, meta.decode_tokens).view(-1, h, g, d)  # [n_decode, H_kv, group, D]
        o = torch.empty_like(q)
        flat = kv_cache.view(2 * nb * h, bs * d)
        workspace = torch.empty(
            (max(c.kv_rows.numel() for c in chunks), bs * d), dtype=kv_cache.dtype, device=kv_cache.device
        )
        window = self.spec.sliding_window
        if window is not None and window >= max(meta.decode_seq_lens):
            window = None  # the window covers every sequence: share the plain mask
        for c in chunks:
            n = c.end - c.start
            rows = workspace[: c.kv_rows.numel()]
            torch.index_select(flat, 0, c.kv_rows, out=rows)
            if c.pad_rows is not None:
                rows.view(-1, d).index_fill_(0, c.pad_rows, 0)
            kv = rows.view(2, n, h, c.max_len, d).to(q.dtype)  # keys then values, [n, H_kv, max_len, D] each
            o[c.start : c.end] = self._attend_decode(q[c.start : c.end], kv[0], kv[1], c, window)
        out.index_copy_(0, meta.decode_tokens, o.view(-1, self.spec.num_heads, d))

    def _decode_chunks(self, kv_cache: torch.Tensor, meta: CpuAttentionMetadata) -> list[DecodeChunk]:
        """Group decodes so each group's gathered K+V is about DECODE_CHUNK_BYTES; cached per step."""
        _, nb, h, bs, d = kv_cache.shape
        cache_key = (nb * h, d * kv_cache.element_size())
        chunks = meta.decode_chunks.get(cache_key)
        if chunks is not None:
            return chunks
        block_bytes = 2 * h * bs * d * kv_cache.element_size()
        lens = meta.decode_seq_lens
        bounds: list[tuple[int, int, int]] = []  # (start, end, max blocks)
        start, widest = 0, 0
        for i, seq_len in enumerate(lens):
            blocks = _blocks_for(seq_len, bs)
            wider = max(widest, blocks)
            if i > start and (i - start + 1) * wider * block_bytes > DECODE_CHUNK_BYTES:
                bounds.append((start, i, widest))
                start, wider = i, blocks
            widest = wider
        bounds.append((start, len(lens), widest))

        heads = torch.arange(h, dtype=torch.long).view(1, h, 1)
        last_pos = torch.tensor(lens, dtype=torch.long).view(-1, 1) - 1
        chunks = []
        for start, end, blocks in bounds:
            n, max_len = end - start, blocks * bs
            tables = meta.decode_block_tables[start:end, :blocks]  # [n, blocks]
            k_rows = tables.unsqueeze(1) * h + heads  # [n, H_kv, blocks]
            rows = torch.stack((k_rows, k_rows + nb * h)).view(-1)
            seq, pos = (torch.arange(max_len).view(1, -1) > last_pos[start:end]).nonzero(as_tuple=True)
            pad_rows = None
            if seq.numel():
                # row of (kv, seq, head, pos) in [2, n, H_kv, max_len]
                base = seq * (h * max_len) + pos  # [num_pad]
                pad_rows = (
                    base.view(1, 1, -1)
                    + heads.view(1, h, 1) * max_len
                    + torch.tensor([0, n * h * max_len]).view(2, 1, 1)
                ).view(-1)
            chunks.append(DecodeChunk(start, end, rows, max_len, last_pos[start:end], pad_rows))
        meta.decode_chunks[cache_key] = chunks
        return chunks

    def _attend_decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: DecodeChunk, window: int | None
    ) -> torch.Tensor:
        """q [n, H_kv, group, D]; k, v [n, H_kv, L, D] -> [n, H_kv, group, D]."""
        if self.spec.logit_soft_cap is None:
            bias = chunk.bias_for(window, q.dtype)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.spec.scale)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2))  # [n, H_kv, group, L]
        probs = self._soft_capped_probs(scores, chunk.visible_for(window))
        return torch.matmul(probs, v.float()).to(q.dtype)

    def _soft_capped_probs(self, scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        cap = self.spec.logit_soft_cap
        scores = torch.tanh(scores.mul_(self.spec.scale / cap)).mul_(cap)
        return torch.softmax(scores.masked_fill_(~visible, float("-inf")), dim=-1)

    def _prefill(
        self,
        seq: PrefillSeq,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        _, nb, h, bs, d = kv_cache.shape
        g = self.spec.num_heads // h
        q_len = seq.q_end - seq.q_start
        q = query[seq.q_start : seq.q_end].unflatten(1, (h, g)).permute(1, 2, 0, 3)  # [H_kv, g, q_len, D]
        if seq.context_len == 0:
            # Nothing cached before this step: attend to this step's keys directly, no gather.
            k = key[seq.q_start : seq.q_end].transpose(0, 1)  # [H_kv, seq_len, D]
            v = value[seq.q_start : seq.q_end].transpose(0, 1)
            if kv_cache.dtype != query.dtype:
                # as the cache holds them (a bf16 cache beside an fp32 model): the same keys and values
                # every later step, a prefix-cache hit or the C kernel's prefills read
                k, v = k.to(kv_cache.dtype).to(query.dtype), v.to(kv_cache.dtype).to(query.dtype)
        else:
            rows = seq.kv_rows.get(nb * h)
            if rows is None:
                k_rows = seq.block_table.view(1, -1) * h + torch.arange(h, dtype=torch.long).view(h, 1)
                rows = seq.kv_rows[nb * h] = torch.stack((k_rows, k_rows + nb * h)).view(-1)
            kv = kv_cache.view(2 * nb * h, bs * d).index_select(0, rows).view(2, h, -1, d).to(query.dtype)
            k, v = kv[0, :, : seq.seq_len], kv[1, :, : seq.seq_len]
        if self.spec.logit_soft_cap is None:
            bias = self._prefill_bias(seq, query.dtype)
            # GQA: a stride-0 expand over the group dim; SDPA reads it without copying.
            o = F.scaled_dot_product_attention(
                q,
                k.unsqueeze(1).expand(h, g, seq.seq_len, d),
                v.unsqueeze(1).expand(h, g, seq.seq_len, d),
                attn_mask=bias,
                is_causal=bias is None,
                scale=self.spec.scale,
            )
        else:
            visible = self._prefill_visible(seq, self._window_for(seq.seq_len))
            scores = torch.matmul(q.float().reshape(h, g * q_len, d), k.float().transpose(-1, -2))
            probs = self._soft_capped_probs(scores.view(h, g, q_len, -1), visible)
            o = torch.matmul(probs.view(h, g * q_len, -1), v.float()).view(h, g, q_len, d).to(q.dtype)
        out[seq.q_start : seq.q_end].view(q_len, h, g, d).copy_(o.permute(2, 0, 1, 3))

    def _window_for(self, seq_len: int) -> int | None:
        """The sliding window, or None when it covers the whole sequence (so masks can be shared)."""
        window = self.spec.sliding_window
        return None if window is None or window >= seq_len else window

    def _prefill_visible(self, seq: PrefillSeq, window: int | None) -> torch.Tensor:
        """[q_len, seq_len] bool: which keys each query of this sequence sees; once per step."""
        mask = seq.visible.get(window)
        if mask is None:
            q_pos = torch.arange(seq.context_len, seq.seq_len, dtype=torch.long).view(-1, 1)
            k_pos = torch.arange(seq.seq_len, dtype=torch.long).view(1, -1)
            mask = seq.visible[window] = _visible(q_pos, k_pos, window)
        return mask

    def _prefill_bias(self, seq: PrefillSeq, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive mask for SDPA, or None when plain causal attention (is_causal) is exact."""
        window = self._window_for(seq.seq_len)
        if seq.context_len == 0 and window is None:
            return None
        bias = seq.biases.get((window, dtype))
        if bias is None:
            bias = seq.biases[(window, dtype)] = _additive(self._prefill_visible(seq, window), dtype)
        return bias
