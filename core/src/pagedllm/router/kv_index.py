"""A replica's prefix-cache index as a router sees it, rebuilt from the engine core's KV events.

``KVCacheView`` holds the block hashes (with parents) one engine core has cached; ``KVEventSubscriber``
keeps it current from the PUB socket, checks each batch's sequence number, and on a gap, an engine
restart (new epoch) or at start fetches a snapshot and resumes from the snapshot's sequence number.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence

import zmq

from pagedllm.core.block_pool import hash_block

logger = logging.getLogger("pagedllm.router.kv_index")


def prompt_block_hashes(token_ids: Sequence[int], block_size: int, cache_salt: str | None = None) -> list[bytes]:
    """The hashes the engine would look up for this prompt (it never serves the last token from cache)."""
    hashes: list[bytes] = []
    parent: bytes | None = None
    for i in range((len(token_ids) - 1) // block_size):
        extra = (cache_salt,) if i == 0 and cache_salt is not None else ()
        parent, _ = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], extra)
        hashes.append(parent)
    return hashes


class KVCacheView:
    """Block hash -> parent hash for every block the engine core has indexed (as of ``seq``)."""

    def __init__(self) -> None:
        self.blocks: dict[bytes, bytes | None] = {}
        self.block_size: int | None = None

    def apply(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "BlockStored":
            parent = bytes.fromhex(event["parent_block_hash"]) if event.get("parent_block_hash") else None
            self.block_size = int(event.get("block_size") or self.block_size or 0) or None
            for h in event["block_hashes"]:
                block = bytes.fromhex(h)
                self.blocks[block] = parent
                parent = block
        elif kind == "BlockRemoved":
            for h in event["block_hashes"]:
                self.blocks.pop(bytes.fromhex(h), None)
        elif kind == "AllBlocksCleared":
            self.blocks.clear()
        else:
            raise ValueError(f"unknown KV event type {kind!r}")

    def load_snapshot(self, snap: dict) -> None:
        self.block_size = int(snap["block_size"])
        self.blocks = {bytes.fromhex(h): (bytes.fromhex(p) if p else None) for h, p in snap["blocks"]}

    def matched_blocks(self, hashes: Sequence[bytes]) -> int:
        """How many of the prompt's leading blocks are cached (the chain breaks at the first miss)."""
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            n += 1
        return n


class KVEventSubscriber:
    """Keeps a ``KVCacheView`` of one engine core current; ``start()`` runs it on a daemon thread."""

    def __init__(self, endpoint: str, snapshot_endpoint: str, topic: str = "kv-events",
                 snapshot_timeout_s: float = 5.0, name: str = "") -> None:
        self.endpoint = endpoint
        self.snapshot_endpoint = snapshot_endpoint
        self.topic = topic.encode()
        self.snapshot_timeout_s = snapshot_timeout_s
        self.name = name or endpoint
        self.view = KVCacheView()
        self.lock = threading.Lock()
        self.seq: int | None = None  # last batch applied; None until the first snapshot
        self.epoch: str | None = None
        self.num_resyncs = 0
        self.num_gaps = 0
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._synced = threading.Event()

    # --- queries (any thread) ---------------------------------------------------------------------
    @property
    def synced(self) -> bool:
        return self.seq is not None

    def wait_synced(self, timeout_s: float) -> bool:
        return self._synced.wait(timeout_s)

    def matched_blocks(self, hashes: Sequence[bytes]) -> int:
        with self.lock:
            return self.view.matched_blocks(hashes) if self.seq is not None else 0

    @property
    def block_size(self) -> int | None:
        return self.view.block_size

    def blocks(self) -> dict[bytes, bytes | None]:
        with self.lock:
            return dict(self.view.blocks)

    # --- the receive loop ---------------------------------------------------------------------------
    def start(self) -> KVEventSubscriber:
        self._thread = threading.Thread(target=self._run, name=f"kv-events {self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._ctx.term()

    def _run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        sub.connect(self.endpoint)
        try:
            self.resync()
            while not self._stop.is_set():
                if not sub.poll(100):
                    if self.seq is None:
                        self.resync()
                    continue
                topic, seq_bytes, body = sub.recv_multipart()
                self.handle(int.from_bytes(seq_bytes, "big"), json.loads(body))
        except Exception:  # a malformed message or a closed context: log it; queries then see a stale view
            if not self._stop.is_set():
                logger.exception("KV event subscriber for %s stopped", self.name)
        finally:
            sub.close(linger=0)

    def handle(self, seq: int, batch: dict) -> None:
        """Apply one published batch, resyncing first when it does not follow the last one applied."""
        if self.seq is not None and batch.get("epoch") == self.epoch:
            if seq <= self.seq:
                return  # already in the snapshot
            if seq == self.seq + 1:
                with self.lock:
                    for event in batch["events"]:
                        self.view.apply(event)
                    self.seq = seq
                return
            self.num_gaps += 1
            logger.warning("KV events from %s: expected seq %d, got %d; resyncing", self.name, self.seq + 1, seq)
        if not self.resync():
            return
        if batch.get("epoch") == self.epoch and seq == self.seq + 1:
            self.handle(seq, batch)

    def resync(self) -> bool:
        """Replace the view with the engine's snapshot; False (view kept, marked unsynced) on timeout."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.snapshot_endpoint)
        try:
            sock.send(b"snapshot")
            if not sock.poll(int(self.snapshot_timeout_s * 1000)):
                logger.warning("no KV snapshot from %s within %.1f s", self.name, self.snapshot_timeout_s)
                with self.lock:
                    self.seq = None
                self._synced.clear()
                return False
            seq_bytes, body = sock.recv_multipart()
        finally:
            sock.close(linger=0)
        snap = json.loads(body)
        with self.lock:
            self.view.load_snapshot(snap)
            self.seq = int.from_bytes(seq_bytes, "big")
            self.epoch = snap["epoch"]
        self.num_resyncs += 1
        self._synced.set()
        return True
