"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.model.layers.parallel_state import TensorParallelGroup, resolve_tp
from pagedllm.model.layers.weight_utils import check_shape
from pagedllm.ops import OPS
from pagedllm.ops.packed import PackedWeight


class VocabParallelEmbedding(nn.Module):
    """Rows [rank*per_rank, (rank+1)*per_rank) of the table; the vocabulary is padded to a multiple of tp."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        tp_rank: int | None = None,
        tp_size: int | None = None,
        tp_group: TensorParallelGroup | None = None,
    ) -> None:
        super().__init__()
        self.tp = resolve_tp(tp_rank, tp_size, tp_group)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_per_partition = -(-num_embeddings // self.tp.size)
        self.vocab_start = self.tp.rank * self.num_embeddings_per_partition
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        # [vocab / tp, hidden]; padding rows stay zero. Left untouched otherwise: a table the loader
        # keeps as blocks is never filled, so it never takes memory.
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim), requires_grad=False)
        self.weight.data[self.vocab_end - self.vocab_start :].zero_()
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.dtype = self.weight.dtype  # the model's: rows read from blocks (fp32) are cast to it
        # The checkpoint's quantized blocks, kept by the loader instead of ``weight`` (then on the meta
        # device) when the platform multiplies them (the table is also a tied LM head's weight).
        self.packed: PackedWeight | None = None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        check_shape(loaded, (self.num_embeddings, self.embedding_dim))
        n = self.vocab_end - self.vocab_start
        param.data[:n].copy_(loaded.narrow(0, self.vocab_start, n))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:  # only at tp 1
            return OPS.packed_embedding(input_ids, self.packed).to(self.dtype)
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        out = F.embedding((input_ids - self.vocab_start) * local, self.weight)
        out = out * local.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection; logits of every rank are gathered, padding columns dropped."""

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's table (tied word embeddings): same partitioning, one tensor (the loader
        gives both the same blocks when it keeps the table as blocks)."""
        self.weight = embedding.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab]
        logits = OPS.packed_linear(hidden, self.weight, None, self.packed)
        if self.tp.size > 1:
            logits = self.tp.all_gather(logits, dim=-1)
        if logits.shape[-1] != self.num_embeddings:
            logits = logits[..., : self.num_embeddings]
        return logits

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.compute_logits(hidden)
