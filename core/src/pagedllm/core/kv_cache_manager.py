"""The KV cache manager: each sequence's block table, prefix-cache hits, copy-on-write forks and usage figures."""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.core.block_pool import BlockPool, KVBlock, hash_block
from pagedllm.core.request import Sequence


@dataclass(slots=True)
class KVCacheUsage:
    num_blocks: int
    num_used_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    usage: float  # fraction of blocks referenced by a sequence
    waste: float  # allocated slots not holding a token / allocated slots
    prefix_queries: int  # tokens looked up in the prefix cache (cumulative)
    prefix_hits: int  # tokens found (cumulative)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


class KVCacheManager:
    """Maps sequences to blocks of ``block_size`` token slots in a pool of ``num_blocks``.

    Prefix caching: a full block is indexed under a hash chained over (parent hash, its token
    ids, cache_salt for the first block) once its keys/values are written; a new sequence reuses
    the longest chain of verified hits, always leaving at least its last token to compute (that
    token's logits are needed). Partial blocks are never indexed, so they are never shared
    through the cache, only through ``fork``.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.tables: dict[int, list[KVBlock]] = {}
        self.id_tables: dict[int, list[int]] = {}  # the same tables as block ids, kept in step for the runner
        self.owners: dict[int, Sequence] = {}
        self.num_indexed: dict[int, int] = {}  # leading full blocks of a sequence already in the index
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def block_ids(self, seq: Sequence) -> list[int]:
        """The sequence's block table (the live list: read it, do not keep it across steps)."""
        return self.id_tables.get(seq.seq_id, [])

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _extend_hashes(self, seq: Sequence, num_blocks: int) -> None:
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1][0] if hashes else None
            extra = (seq.cache_salt,) if i == 0 and seq.cache_salt is not None else ()
            hashes.append(hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs], extra))

    def get_computed_blocks(self, seq: Sequence) -> tuple[list[KVBlock], int]:
        """Longest verified prefix-cache hit for a sequence with nothing computed: (blocks, tokens)."""
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs or seq.num_computed_tokens:
            return [], 0
        # At most num_tokens - 1 tokens may come from the cache: the last one must be computed.
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._extend_hashes(seq, max_blocks)
        hits: list[KVBlock] = []
        for block_hash, key in seq.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash, key)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted sequence's lookup (only admissions, so a stalled queue is not recounted)."""
        if self.enable_prefix_caching:
            self.prefix_queries += num_tokens
            self.prefix_hits += num_hit_tokens

    def allocate_slots(
        self, seq: Sequence, num_new_tokens: int, computed_blocks: list[KVBlock] | None = None
    ) -> list[tuple[int, int]] | None:
        """Make room for ``num_new_tokens`` more tokens after the computed ones.

        ``computed_blocks`` are prefix-cache hits (from ``get_computed_blocks``) to adopt first.
        Returns the (src, dst) block copies to run before the forward (copy-on-write of a
        shared partial block), or None, changing nothing, if the pool cannot provide the blocks.
        """
        bs = self.block_size
        table = self.tables.get(seq.seq_id, [])
        if not computed_blocks:
            # Fast path (most decode steps): the new tokens fit in blocks we own outright or fill afresh.
            num_computed = seq.num_computed_tokens
            if num_computed + num_new_tokens <= len(table) * bs and (
                num_computed % bs == 0 or table[-1].ref_count == 1
            ):
                return []
            computed_blocks = []
        num_computed = seq.num_computed_tokens + len(computed_blocks) * bs
        need = max(0, self.blocks_needed(num_computed + num_new_tokens) - len(table) - len(computed_blocks))
        # Writing into a partially filled block that a fork still shares needs a private copy.
        cow = int(num_new_tokens > 0 and num_computed % bs != 0 and table[-1].ref_count > 1)
        evictable_hits = sum(1 for b in computed_blocks if b.ref_count == 0)
        if need + cow > self.pool.num_free_blocks - evictable_hits:
            return None
        if seq.seq_id not in self.tables:
            self.tables[seq.seq_id] = table
            self.id_tables[seq.seq_id] = []
            self.owners[seq.seq_id] = seq
        ids = self.id_tables[seq.seq_id]
        if computed_blocks:
            self.pool.touch(computed_blocks)
            table.extend(computed_blocks)
            ids.extend(b.block_id for b in computed_blocks)
            self.num_indexed[seq.seq_id] = len(table)
        pairs: list[tuple[int, int]] = []
        if cow:
            (new,) = self.pool.get_new_blocks(1)
            old = table[-1]
            pairs.append((old.block_id, new.block_id))
            self.pool.free_blocks([old])
            table[-1] = new
            ids[-1] = new.block_id
        if need:
            new_blocks = self.pool.get_new_blocks(need)
            table.extend(new_blocks)
            ids.extend(b.block_id for b in new_blocks)
        return pairs

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Index the blocks that the last step filled (their keys/values are now written)."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        done = self.num_indexed.get(seq.seq_id, 0)
        if num_full <= done:
            return
        self._extend_hashes(seq, num_full)
        table = self.tables[seq.seq_id]
        for i in range(done, num_full):
            block_hash, key = seq.block_hashes[i]
            self.pool.cache_block(table[i], block_hash, key)
        self.num_indexed[seq.seq_id] = num_full

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let ``child`` share every block of ``parent`` (ref counts); writes later copy on demand."""
        table = self.tables[parent.seq_id]
        self.pool.touch(table)
        self.tables[child.seq_id] = list(table)
        self.id_tables[child.seq_id] = list(self.id_tables[parent.seq_id])
        self.owners[child.seq_id] = child
        self.num_indexed[child.seq_id] = self.num_indexed.get(parent.seq_id, 0)

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq`` (finish, abort or preemption); tail blocks are evicted first."""
        table = self.tables.pop(seq.seq_id, None)
        self.id_tables.pop(seq.seq_id, None)
        self.owners.pop(seq.seq_id, None)
        self.num_indexed.pop(seq.seq_id, None)
        if table:
            self.pool.free_blocks(reversed(table))

    def usage(self) -> KVCacheUsage:
        bs = self.block_size
        filled: dict[int, int] = {}
        for seq_id, table in self.tables.items():
            n = self.owners[seq_id].num_computed_tokens
            for i, block in enumerate(table):
                f = min(bs, max(0, n - i * bs))
                if f > filled.get(block.block_id, -1):
                    filled[block.block_id] = f
        used = self.pool.num_used_blocks
        slots = len(filled) * bs
        return KVCacheUsage(
            num_blocks=self.pool.num_blocks,
            num_used_blocks=used,
            num_free_blocks=self.pool.num_free_blocks,
            num_cached_blocks=self.pool.num_cached_blocks,
            usage=used / self.pool.num_blocks,
            waste=(slots - sum(filled.values())) / slots if slots else 0.0,
            prefix_queries=self.prefix_queries,
            prefix_hits=self.prefix_hits,
        )
