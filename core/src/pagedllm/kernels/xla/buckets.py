"""Shape buckets: the few (tokens, sequences, blocks per sequence) shapes an XLA backend compiles.

Token counts are padded to powers of two up to the padding gap, then to multiples of the gap
(as vLLM's TPU runner does: doubling wastes up to half a step on large batches, a fixed gap
bounds the waste). The sequence count follows the token bucket (a step never has more sequences
than tokens), so the graphs are tokens x blocks-per-sequence, not a third dimension.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from pagedllm.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Bucket:
    """One compiled shape: every step is padded up to one of these."""

    num_tokens: int
    num_seqs: int
    num_blocks: int  # block-table width (blocks per sequence)

    def __str__(self) -> str:
        return f"tokens={self.num_tokens} seqs={self.num_seqs} blocks/seq={self.num_blocks}"


def padded_sizes(minimum: int, maximum: int, gap: int = 0) -> list[int]:
    """Powers of two from ``minimum`` until ``gap`` (all of them when gap is 0), then multiples of
    ``gap``, the last one covering ``maximum``."""
    if minimum < 1 or maximum < 1:
        raise ConfigError(f"bucket limits must be >= 1, got {minimum} and {maximum}")
    sizes = [minimum]
    while sizes[-1] < maximum:
        last = sizes[-1]
        sizes.append(last * 2 if gap <= 0 or last < gap else last + gap)
    if gap > 0:  # the switch from doubling to the gap may overshoot a gap multiple; keep it exact
        sizes = sorted({s if s <= gap else -(-s // gap) * gap for s in sizes})
    return sizes


@dataclass(frozen=True, slots=True)
class ShapeBuckets:
    """The bucket grid chosen from the engine config by a platform's rule."""

    tokens: tuple[int, ...]
    blocks: tuple[int, ...]
    max_seqs: int  # the sequence dimension: min(token bucket, max_seqs)

    @classmethod
    def build(
        cls,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        min_tokens: int = 16,
        token_gap: int = 0,
        min_blocks: int = 1,
        fixed_blocks: bool = False,
    ) -> ShapeBuckets:
        tokens = padded_sizes(min(min_tokens, max_num_batched_tokens), max_num_batched_tokens, token_gap)
        if fixed_blocks:  # block tables always padded to the longest a sequence can need
            blocks = [max_blocks_per_seq]
        else:
            blocks = padded_sizes(min(min_blocks, max_blocks_per_seq), max_blocks_per_seq)
        return cls(tuple(tokens), tuple(blocks), max_num_seqs)

    def seqs_for(self, num_tokens_bucket: int) -> int:
        return min(num_tokens_bucket, self.max_seqs)

    def select(self, num_tokens: int, num_seqs: int, num_blocks: int) -> Bucket:
        """The smallest bucket holding a step; a step beyond every bucket is a config bug."""
        i = bisect.bisect_left(self.tokens, num_tokens)
        j = bisect.bisect_left(self.blocks, num_blocks)
        if i == len(self.tokens) or j == len(self.blocks) or num_seqs > self.max_seqs:
            raise ConfigError(
                f"a step of {num_tokens} tokens, {num_seqs} sequences and {num_blocks} blocks per sequence "
                f"exceeds the largest shape bucket (tokens {self.tokens[-1]}, seqs {self.max_seqs}, "
                f"blocks {self.blocks[-1]})"
            )
        t = self.tokens[i]
        return Bucket(t, self.seqs_for(t), self.blocks[j])

    def all(self) -> list[Bucket]:
        """Every (tokens, blocks) bucket: what warm-up compiles."""
        return [Bucket(t, self.seqs_for(t), b) for t in self.tokens for b in self.blocks]

    def __len__(self) -> int:
        return len(self.tokens) * len(self.blocks)
