"""The block pool: fixed-size KV blocks with reference counts, an LRU free queue and the prefix-cache index."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pagedllm.core.kv_events import KVEventRecorder


@dataclass(frozen=True, slots=True)
class BlockHashKey:
    """What a cached block's hash covers; kept so a hit can be re-verified exactly."""

    parent: bytes | None
    token_ids: tuple[int, ...]
    extra: tuple = ()


def hash_block(
    parent: bytes | None, token_ids: Sequence[int], extra: tuple = ()
) -> tuple[bytes, BlockHashKey]:
    """Chained hash of one full block: (parent hash, its token ids, extra keys such as cache_salt)."""
    key = BlockHashKey(parent, tuple(token_ids), extra)
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0")
    h.update(array("q", key.token_ids).tobytes())
    if extra:
        h.update(repr(extra).encode())
    return h.digest(), key


@dataclass(slots=True, eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set while the block is in the prefix-cache index
    hash_key: BlockHashKey | None = None


class BlockPool:
    """Owns every block. Blocks with ref_count 0 sit in the free queue, which is also the eviction order.

    The head of the queue is evicted first. A freed block that holds a cached prefix goes to the
    tail (least recently used evicted first); a freed block with nothing reusable goes to the head.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, KVBlock] = {}
        self.num_evictions = 0
        self.events: KVEventRecorder | None = None  # set when KV events are published (off by default)

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free ones, including evictable cached ones)."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        """Pop ``n`` blocks from the head of the free queue, evicting their cached prefix if any."""
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks but only {len(self.free_queue)} are free")
        out = []
        for _ in range(n):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                self._uncache(block)
                self.num_evictions += 1
            block.ref_count = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on blocks found in the prefix cache (pulling them out of the free queue)."""
        for block in blocks:
            if block.ref_count == 0:
                del self.free_queue[block.block_id]
            block.ref_count += 1

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block, in the order given (earlier ones are evicted earlier)."""
        for block in blocks:
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block.block_id} freed more times than it was allocated")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block.block_id] = None
                if block.block_hash is None:
                    self.free_queue.move_to_end(block.block_id, last=False)

    def cache_block(self, block: KVBlock, block_hash: bytes, key: BlockHashKey) -> None:
        """Index a full block under its hash; if an equal block is already indexed, keep that one."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self.cached:
            return
        block.block_hash = block_hash
        block.hash_key = key
        self.cached[block_hash] = block
        if self.events is not None:
            self.events.stored(block_hash, key.parent, key.token_ids)

    def lookup(self, block_hash: bytes, key: BlockHashKey) -> KVBlock | None:
        """The cached block for this hash, only if its stored contents match exactly."""
        block = self.cached.get(block_hash)
        if block is None or block.hash_key != key:
            return None
        return block

    def _uncache(self, block: KVBlock) -> None:
        assert block.block_hash is not None
        if self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
            if self.events is not None:
                self.events.removed(block.block_hash)
        block.block_hash = None
        block.hash_key = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; only allowed when no block is in use (like vLLM)."""
        if self.num_used_blocks:
            return False
        for block in list(self.cached.values()):
            self._uncache(block)
        if self.events is not None:
            self.events.cleared()
        return True
