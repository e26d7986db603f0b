"""KV cache events: the prefix-cache index's changes (blocks stored, blocks removed, all cleared) as plain records.

The block pool appends them as they happen; the engine core publishes them (``engine/kv_event_publisher.py``)
and routers rebuild each replica's cache index from them (``router/kv_index.py``). Field names follow
vLLM's KV events (BlockStored / BlockRemoved / AllBlocksCleared); hashes travel as hex strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union


@dataclass(slots=True)
class BlockStored:
    """Full blocks newly indexed, in chain order: block_hashes[0]'s parent is parent_block_hash."""

    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]
    block_size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "BlockStored",
            "block_hashes": [h.hex() for h in self.block_hashes],
            "parent_block_hash": self.parent_block_hash.hex() if self.parent_block_hash else None,
            "token_ids": self.token_ids,
            "block_size": self.block_size,
        }


@dataclass(slots=True)
class BlockRemoved:
    """Blocks evicted from the index (their slots were handed to new data)."""

    block_hashes: list[bytes]

    def to_json(self) -> dict[str, Any]:
        return {"type": "BlockRemoved", "block_hashes": [h.hex() for h in self.block_hashes]}


@dataclass(slots=True)
class AllBlocksCleared:
    """The whole index was dropped (reset_prefix_cache)."""

    def to_json(self) -> dict[str, Any]:
        return {"type": "AllBlocksCleared"}


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


@dataclass(slots=True)
class KVEventRecorder:
    """Collects the pool's index changes between two publishes; merges runs into one record where it can."""

    block_size: int
    events: list[KVEvent] = field(default_factory=list)

    def stored(self, block_hash: bytes, parent: bytes | None, token_ids: tuple[int, ...]) -> None:
        last = self.events[-1] if self.events else None
        if isinstance(last, BlockStored) and last.block_hashes[-1] == parent:
            last.block_hashes.append(block_hash)
            last.token_ids.extend(token_ids)
            return
        self.events.append(BlockStored([block_hash], parent, list(token_ids), self.block_size))

    def removed(self, block_hash: bytes) -> None:
        last = self.events[-1] if self.events else None
        if isinstance(last, BlockRemoved):
            last.block_hashes.append(block_hash)
            return
        self.events.append(BlockRemoved([block_hash]))

    def cleared(self) -> None:
        self.events.clear()  # whatever came before is superseded
        self.events.append(AllBlocksCleared())

    def take(self) -> list[KVEvent]:
        out, self.events = self.events, []
        return out
