"""The router-side KV view: events and snapshots build the same index; replica specs parse or fail clearly."""

from __future__ import annotations

import pytest
from pagedllm.core.block_pool import hash_block
from pagedllm.core.kv_events import KVEventRecorder
from pagedllm.router.kv_index import KVCacheView, prompt_block_hashes
from pagedllm.router.replica_pool import ReplicaSpec


def _chain(tokens: list[int], bs: int) -> list[tuple[bytes, bytes | None, tuple[int, ...]]]:
    out, parent = [], None
    for i in range(len(tokens) // bs):
        block = tuple(tokens[i * bs : (i + 1) * bs])
        h, _ = hash_block(parent, block)
        out.append((h, parent, block))
        parent = h
    return out


def test_recorded_events_replayed_into_a_view_give_the_chain_and_removals():
    rec = KVEventRecorder(block_size=2)
    chain = _chain([1, 2, 3, 4, 5, 6], 2)
    for h, parent, block in chain:
        rec.stored(h, parent, block)
    rec.removed(chain[2][0])
    events = [e.to_json() for e in rec.take()]
    assert [e["type"] for e in events] == ["BlockStored", "BlockRemoved"]  # one stored run, merged
    assert events[0]["token_ids"] == [1, 2, 3, 4, 5, 6]
    view = KVCacheView()
    for e in events:
        view.apply(e)
    assert view.blocks == {chain[0][0]: None, chain[1][0]: chain[0][0]}
    assert view.matched_blocks(prompt_block_hashes([1, 2, 3, 4, 5, 6, 7], 2)) == 2
    view.apply({"type": "AllBlocksCleared"})
    assert view.blocks == {}


def test_prompt_hashes_leave_the_last_token_to_compute():
    assert len(prompt_block_hashes(list(range(8)), 4)) == 1  # 8 tokens: the second block holds the last token
    assert len(prompt_block_hashes(list(range(9)), 4)) == 2
    assert prompt_block_hashes(list(range(9)), 4, "salt")[0] != prompt_block_hashes(list(range(9)), 4)[0]


def test_unknown_event_type_is_an_error():
    with pytest.raises(ValueError, match="Mystery"):
        KVCacheView().apply({"type": "Mystery"})


def test_replica_specs():
    spec = ReplicaSpec.parse("http://h:8000/,events=tcp://h:5557,snapshot=tcp://h:5558")
    assert (spec.url, spec.events, spec.snapshot) == ("http://h:8000", "tcp://h:5557", "tcp://h:5558")
    assert ReplicaSpec.parse("http://h:1").events is None
    for bad in ("h:8000", "http://h:1,events=tcp://h:2", "http://h:1,foo=bar"):
        with pytest.raises(ValueError):
            ReplicaSpec.parse(bad)
