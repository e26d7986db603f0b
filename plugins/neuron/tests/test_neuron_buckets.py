"""Neuron's bucketing rule on the shared machinery: powers of two, block tables always full width."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="needs torch-xla (tox -e xla)")


def test_neuron_pads_block_tables_to_max_model_len_and_tokens_to_powers_of_two() -> None:
    from pagedllm.plugin import EngineConfig

    from pagedllm_neuron.platform import NeuronPlatform

    config = EngineConfig()
    config.scheduler.max_num_batched_tokens = 100
    config.scheduler.max_num_seqs = 8
    buckets = NeuronPlatform.make_buckets(NeuronPlatform.__new__(NeuronPlatform), config, max_blocks_per_seq=32)
    assert buckets.tokens == (8, 16, 32, 64, 128) and buckets.blocks == (32,)
    assert buckets.select(3, 2, 1).num_blocks == 32 and buckets.select(65, 8, 5).num_tokens == 128
    assert buckets.select(65, 8, 5).num_seqs == 8
