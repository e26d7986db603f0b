"""Publishes the engine core's KV cache events over ZMQ and answers snapshot requests.

Wire format (JSON, so any language can subscribe and nothing is unpickled from the network):
  PUB   [topic, seq (8 bytes big-endian), {"epoch", "ts", "data_parallel_rank", "events": [...]}]
  ROUTER request [b"snapshot"] -> [seq, {"epoch", "block_size", "data_parallel_rank",
                                        "blocks": [[hash, parent or null], ...]}]
``seq`` counts batches from 1 and the snapshot carries the seq of the last batch it includes, so a
subscriber that sees a gap fetches a snapshot and resumes at seq + 1. ``epoch`` changes when the
engine restarts (its seq starts over).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

import zmq

from pagedllm.config import KVEventsConfig
from pagedllm.core.block_pool import BlockPool
from pagedllm.core.kv_events import KVEventRecorder

logger = logging.getLogger("pagedllm.engine.kv_event_publisher")


def offset_endpoint(endpoint: str, rank: int) -> str:
    """The endpoint of data-parallel rank ``rank``: a tcp port plus the rank, an ipc path with ``-rank``."""
    if rank == 0:
        return endpoint
    m = re.fullmatch(r"(tcp://.+):(\d+)", endpoint)
    if m:
        return f"{m.group(1)}:{int(m.group(2)) + rank}"
    if endpoint.startswith("ipc://"):
        return f"{endpoint}-{rank}"
    raise ValueError(f"cannot derive data-parallel rank {rank}'s endpoint from {endpoint!r}; give a tcp port or ipc path")


class KVEventPublisher:
    """Owns the PUB and snapshot sockets of one engine core; ``publish()`` runs once per step."""

    def __init__(self, config: KVEventsConfig, pool: BlockPool, block_size: int, data_parallel_rank: int = 0) -> None:
        self.pool = pool
        self.block_size = block_size
        self.rank = data_parallel_rank
        self.topic = config.topic.encode()
        self.epoch = uuid.uuid4().hex
        self.seq = 0
        pool.events = KVEventRecorder(block_size)
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, config.hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._snap = self._ctx.socket(zmq.ROUTER)
        self._snap.setsockopt(zmq.LINGER, 0)
        try:
            self._pub.bind(offset_endpoint(config.endpoint, data_parallel_rank))
            self._snap.bind(offset_endpoint(config.snapshot_endpoint, data_parallel_rank))
        except zmq.ZMQError as exc:
            self.close()
            raise RuntimeError(f"cannot bind the KV events sockets ({config.endpoint}, {config.snapshot_endpoint}): {exc}") from exc
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.snapshot_endpoint = self._snap.getsockopt_string(zmq.LAST_ENDPOINT)
        logger.info("KV events on %s (snapshots on %s)", self.endpoint, self.snapshot_endpoint)

    @property
    def snapshot_socket(self) -> zmq.Socket:
        """For the core process's poller: readable when a subscriber asks for a snapshot."""
        return self._snap

    def publish(self) -> None:
        """Send the events recorded since the last call (if any), then answer pending snapshot requests."""
        self._flush()
        self.answer_snapshots()

    def _flush(self) -> None:
        assert self.pool.events is not None
        events = self.pool.events.take()
        if not events:
            return
        self.seq += 1
        body = {"epoch": self.epoch, "ts": time.time(), "data_parallel_rank": self.rank,
                "events": [e.to_json() for e in events]}
        self._send(self.seq, body)

    def _send(self, seq: int, body: dict) -> None:
        self._pub.send_multipart([self.topic, seq.to_bytes(8, "big"), json.dumps(body).encode()])

    def snapshot(self) -> dict:
        """Every block in the prefix-cache index now, parents before children where the index has both."""
        blocks = [[h.hex(), b.hash_key.parent.hex() if b.hash_key and b.hash_key.parent else None]
                  for h, b in self.pool.cached.items()]
        return {"epoch": self.epoch, "block_size": self.block_size, "data_parallel_rank": self.rank, "blocks": blocks}

    def answer_snapshots(self) -> None:
        while True:
            try:
                frames = self._snap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, request = frames[0], frames[-1]
            if request != b"snapshot":
                logger.warning("unknown KV events request %r ignored", request[:32])
                continue
            self._flush()  # the snapshot must include everything up to the seq it names
            reply = json.dumps(self.snapshot()).encode()
            self._snap.send_multipart([identity, self.seq.to_bytes(8, "big"), reply])

    def close(self) -> None:
        self._pub.close(linger=0)
        self._snap.close(linger=0)
        self._ctx.term()
        self.pool.events = None
