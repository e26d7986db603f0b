"""The AttentionBackend contract and the device-neutral batch description it consumes."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """What one attention layer needs from a backend; fixed at model build time."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    scale: float
    dtype: torch.dtype
    block_size: int
    sliding_window: int | None = None  # key j visible to query i iff 0 <= i - j < sliding_window
    logit_soft_cap: float | None = None  # scores <- cap * tanh(scores / cap), after scaling
    kv_cache_dtype: torch.dtype | None = None  # the KV cache's elements; None: ``dtype`` (see cache_dtype)

    @property
    def cache_dtype(self) -> torch.dtype:
        """The KV cache's element type: ``kv_cache_dtype``, or the model's ``dtype`` when unset."""
        return self.dtype if self.kv_cache_dtype is None else self.kv_cache_dtype

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )


@dataclass(slots=True)
class AttentionBatch:
    """A flattened mixed batch of prefills, chunked prefills and decodes.

    Sequence i owns query tokens ``query_start_loc[i]:query_start_loc[i+1]``; those are the
    last ``q_len_i`` of its ``seq_lens[i]`` tokens (the first ``seq_lens[i] - q_len_i`` are
    already in the KV cache). A sequence with ``q_len_i == 0`` is an empty slot (padding) and
    produces nothing. ``slot_mapping[t]`` is the flat cache slot (``block * block_size +
    offset``) where token t's key/value go; -1 means "do not write" (padding tokens).
    Tensors live on the platform's device; the ``*_cpu`` lists mirror them on the host so
    backends need not synchronise to read them.
    """

    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, unused entries 0
    slot_mapping: torch.Tensor  # [num_tokens] int64
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        pad_tokens_to: int | None = None,
    ) -> "AttentionBatch":
        """Build a batch from per-sequence host lists (what the model runner and tests use)."""
        if not (len(query_lens) == len(seq_lens) == len(block_tables)):
            raise ValueError("query_lens, seq_lens and block_tables must have one entry per sequence")
        qsl = [0]
        slots: list[int] = []
        for q, s, table in zip(query_lens, seq_lens, block_tables):
            if q > s:
                raise ValueError(f"query length {q} exceeds sequence length {s}")
            if s > len(table) * block_size:
                raise ValueError(f"sequence of {s} tokens needs more than {len(table)} blocks")
            qsl.append(qsl[-1] + q)
            for pos in range(s - q, s):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        if pad_tokens_to is not None and pad_tokens_to > len(slots):
            slots.extend([-1] * (pad_tokens_to - len(slots)))
        width = max((len(t) for t in block_tables), default=0) or 1
        tables = torch.zeros((len(block_tables), width), dtype=torch.int32)
        for i, t in enumerate(block_tables):
            if t:
                tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        return cls(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=tables.to(device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=list(seq_lens),
            block_size=block_size,
        )


class AttentionBackend(abc.ABC):
    """One attention implementation for one layer shape. The backend owns its KV layout."""

    name: str = "unnamed"

    def __init__(self, spec: AttentionSpec) -> None:
        self.spec = spec

    @abc.abstractmethod
    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int
    ) -> tuple[int, ...]:
        """Shape of one layer's KV cache tensor (keys and values together)."""

    def supports_kv_cache_dtype(self, dtype: torch.dtype) -> bool:
        """Whether this backend keeps its KV cache in ``dtype`` beside the model's ``spec.dtype``
        (``--kv-cache-dtype``). By default only the model's dtype; a backend that converts as it
        writes and reads (the CPU backend: bf16 beside fp32) says so."""
        return dtype == self.spec.dtype

    def allocate_kv_cache(self, num_blocks: int, device: torch.device | str) -> torch.Tensor:
        s = self.spec
        shape = self.kv_cache_shape(num_blocks, s.block_size, s.num_kv_heads, s.head_size)
        return torch.zeros(shape, dtype=s.cache_dtype, device=device)

    def build_metadata(self, batch: AttentionBatch) -> Any:
        """Turn the device-neutral batch into whatever ``forward`` wants; once per step."""
        return batch

    @abc.abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
        kv_cache: torch.Tensor,
        metadata: Any,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_size]
        """Write key/value into the cache at the slot mapping, then attend (causal)."""

    @abc.abstractmethod
    def read_kv(
        self, kv_cache: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values stored at flat slots, each [len(slots), num_kv_heads, head_size]."""

    @abc.abstractmethod
    def copy_blocks(self, kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
        """Copy whole blocks (copy-on-write): src_to_dst is [num_pairs, 2] int64."""
