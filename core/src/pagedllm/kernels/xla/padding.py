"""Padding a step's host inputs up to its bucket: padded tokens and block-table entries use a dummy block.

The dummy block is one KV block beyond those the scheduler hands out (the model runner allocates
``reserved_kv_blocks`` extra). Padded tokens write their keys and values there and padded
block-table entries point at it, so a padded step touches no live cache entry and every index
stays in bounds (XLA checks nothing at run time; an out-of-range gather would read garbage).
"""

from __future__ import annotations

import numpy as np

from pagedllm.kernels.xla.buckets import Bucket
from pagedllm.worker.model_runner import HostInputs


def pad_host_inputs(h: HostInputs, bucket: Bucket, dummy_block: int, block_size: int) -> HostInputs:
    """``h`` padded to ``bucket``: extra tokens and empty sequences appended, tables widened."""
    n_tok = h.input_ids.shape[0]
    n_seq = h.seq_lens.shape[0]
    T, S, B = bucket.num_tokens, bucket.num_seqs, bucket.num_blocks
    if n_tok > T or n_seq > S or h.block_tables.shape[1] > B:
        raise ValueError(f"a step of {n_tok} tokens / {n_seq} sequences / {h.block_tables.shape[1]} blocks does not fit {bucket}")
    ids = np.zeros(T, dtype=np.int64)
    ids[:n_tok] = h.input_ids
    pos = np.zeros(T, dtype=np.int64)
    pos[:n_tok] = h.positions
    slots = dummy_block * block_size + np.arange(T, dtype=np.int64) % block_size
    slots[:n_tok] = h.slot_mapping
    qsl = np.full(S + 1, h.query_start_loc[-1], dtype=np.int64)
    qsl[: n_seq + 1] = h.query_start_loc
    lens = np.zeros(S, dtype=np.int64)
    lens[:n_seq] = h.seq_lens
    tables = np.full((S, B), dummy_block, dtype=np.int32)
    tables[:n_seq, : h.block_tables.shape[1]] = h.block_tables
    # Unused entries of live rows point at the dummy block too (the runner leaves them 0, a live block).
    width = -(-h.seq_lens // block_size)
    tables[:n_seq][np.arange(B)[None, :] >= width[:, None]] = dummy_block
    return HostInputs(ids, pos, qsl, lens, tables, slots, h.max_query_len)


def dummy_host_inputs(bucket: Bucket, dummy_block: int, block_size: int) -> HostInputs:
    """A step of one token at position 0 in the dummy block, padded to ``bucket`` (what warm-up runs)."""
    h = HostInputs(
        input_ids=np.zeros(1, dtype=np.int64),
        positions=np.zeros(1, dtype=np.int64),
        query_start_loc=np.array([0, 1], dtype=np.int64),
        seq_lens=np.ones(1, dtype=np.int64),
        block_tables=np.full((1, 1), dummy_block, dtype=np.int32),
        slot_mapping=np.array([dummy_block * block_size], dtype=np.int64),
        max_query_len=1,
    )
    return pad_host_inputs(h, bucket, dummy_block, block_size)
