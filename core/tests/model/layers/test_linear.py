"""Sharded weight loading: every rank's slice, recombined as the collectives would, equals the full layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pagedllm.model.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    TensorParallelGroup,
    VocabParallelEmbedding,
    WeightShapeError,
)


class RecordingCommunicator:
    """Stands in for a real group inside one process: returns the input, counts the calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append("all_reduce")
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        self.calls.append("all_gather")
        return x


def ranks(tp: int) -> list[TensorParallelGroup]:
    return [TensorParallelGroup(r, tp, RecordingCommunicator()) for r in range(tp)]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_column_parallel_shards_concatenate_to_the_full_output(tp: int) -> None:
    w, b, x = torch.randn(8, 6), torch.randn(8), torch.randn(3, 6)
    outs = []
    for group in ranks(tp):
        layer = ColumnParallelLinear(6, 8, bias=True, tp_group=group)
        layer.weight_loader(layer.weight, w)
        layer.weight_loader(layer.bias, b)
        outs.append(layer(x))
    torch.testing.assert_close(torch.cat(outs, dim=-1), F.linear(x, w, b))


@pytest.mark.parametrize("tp", [1, 2])
def test_row_parallel_partial_sums_add_up_and_reduce_once(tp: int) -> None:
    w, x = torch.randn(5, 8), torch.randn(3, 8)
    partials = []
    for group in ranks(tp):
        layer = RowParallelLinear(8, 5, bias=False, tp_group=group)
        layer.weight_loader(layer.weight, w)
        x_shard = x.chunk(tp, dim=-1)[group.rank]
        partials.append(layer(x_shard))
        assert group.communicator.calls == (["all_reduce"] if tp > 1 else [])
    torch.testing.assert_close(sum(partials), F.linear(x, w))


def test_tp_size_one_never_touches_the_communicator() -> None:
    group = TensorParallelGroup(0, 1, RecordingCommunicator())
    row = RowParallelLinear(4, 4, bias=True, tp_group=group)
    col = ColumnParallelLinear(4, 4, gather_output=True, tp_group=group)
    emb = VocabParallelEmbedding(10, 4, tp_group=group)
    row(col(emb(torch.tensor([1, 2]))))
    assert group.communicator.calls == []


@pytest.mark.parametrize("tp", [1, 2])
def test_merged_gate_up_loads_each_part_into_its_slot(tp: int) -> None:
    gate, up, x = torch.randn(6, 4), torch.randn(6, 4), torch.randn(2, 4)
    for group in ranks(tp):
        layer = MergedColumnParallelLinear(4, [6, 6], tp_group=group)
        layer.weight_loader(layer.weight, gate, 0)
        layer.weight_loader(layer.weight, up, 1)
        g, u = layer(x).chunk(2, dim=-1)
        n = 6 // tp
        torch.testing.assert_close(g, F.linear(x, gate)[:, group.rank * n : (group.rank + 1) * n])
        torch.testing.assert_close(u, F.linear(x, up)[:, group.rank * n : (group.rank + 1) * n])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_splits_heads_and_replicates_kv_heads_beyond_their_count(tp: int) -> None:
    heads, kv_heads, d, hidden = 4, 2, 3, 5
    q, k, v = (
        torch.randn(heads * d, hidden),
        torch.randn(kv_heads * d, hidden),
        torch.randn(kv_heads * d, hidden),
    )
    x = torch.randn(2, hidden)
    for group in ranks(tp):
        layer = QKVParallelLinear(hidden, d, heads, kv_heads, tp_group=group)
        for shard, w in zip("qkv", (q, k, v), strict=True):
            layer.weight_loader(layer.weight, w, shard)
        out_q, out_k, out_v = layer(x).split([layer.q_size, layer.kv_size, layer.kv_size], dim=-1)
        kv_rank = group.rank * kv_heads // tp if tp > kv_heads else group.rank
        hp = heads // tp
        torch.testing.assert_close(
            out_q, F.linear(x, q).view(2, heads, d)[:, group.rank * hp : (group.rank + 1) * hp].reshape(2, -1)
        )
        kv_per = max(kv_heads // tp, 1)
        ref_k = (
            F.linear(x, k)
            .view(2, kv_heads, d)[:, kv_rank * kv_per : kv_rank * kv_per + kv_per]
            .reshape(2, -1)
        )
        ref_v = (
            F.linear(x, v)
            .view(2, kv_heads, d)[:, kv_rank * kv_per : kv_rank * kv_per + kv_per]
            .reshape(2, -1)
        )
        torch.testing.assert_close(out_k, ref_k)
        torch.testing.assert_close(out_v, ref_v)


def test_kv_heads_that_do_not_split_evenly_go_by_whole_groups_and_attention_output_adds_up() -> None:
    # SmolLM2-135M's shape: 9 heads over 3 KV heads on 2 ranks -> rank 0 takes 2 groups, rank 1 one.
    heads, kv_heads, d, hidden = 9, 3, 2, 5
    q, k, v = torch.randn(heads * d, hidden), torch.randn(kv_heads * d, hidden), torch.randn(kv_heads * d, hidden)
    o = torch.randn(hidden, heads * d)
    x, attn_out = torch.randn(2, hidden), torch.randn(2, heads * d)
    qs, ks, o_sum = [], [], torch.zeros(2, hidden)
    for group in ranks(2):
        layer = QKVParallelLinear(hidden, d, heads, kv_heads, tp_group=group)
        for shard, w in zip("qkv", (q, k, v), strict=True):
            layer.weight_loader(layer.weight, w, shard)
        out_q, out_k, _ = layer(x).split([layer.q_size, layer.kv_size, layer.kv_size], dim=-1)
        qs.append(out_q)
        ks.append(out_k)
        start = layer.q_head_start * d
        o_proj = RowParallelLinear(heads * d, hidden, tp_group=group, input_partition=(start, layer.q_size))
        o_proj.weight_loader(o_proj.weight, o)
        o_sum += o_proj(attn_out[:, start : start + layer.q_size])
    assert [t.shape[-1] for t in qs] == [6 * d, 3 * d] and [t.shape[-1] for t in ks] == [2 * d, 1 * d]
    torch.testing.assert_close(torch.cat(qs, dim=-1), F.linear(x, q))
    torch.testing.assert_close(torch.cat(ks, dim=-1), F.linear(x, k))
    torch.testing.assert_close(o_sum, F.linear(attn_out, o))


def test_qkv_accepts_a_prefused_tensor() -> None:
    w = torch.randn((4 + 2 * 2) * 3, 5)
    layer = QKVParallelLinear(5, 3, 4, 2)
    layer.weight_loader(layer.weight, w)
    torch.testing.assert_close(layer.weight, w)


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_vocab_parallel_embedding_and_head_match_the_full_table(tp: int) -> None:
    table, ids, h = torch.randn(10, 4), torch.tensor([0, 3, 9, 5]), torch.randn(2, 4)
    emb_sum, logits = torch.zeros(4, 4), []
    for group in ranks(tp):
        emb = VocabParallelEmbedding(10, 4, tp_group=group)
        emb.weight_loader(emb.weight, table)
        emb_sum += emb(ids)  # what all_reduce adds up
        head = ParallelLMHead(10, 4, tp_group=group)
        head.weight_loader(head.weight, table)
        logits.append(F.linear(h, head.weight))
    torch.testing.assert_close(emb_sum, table[ids])
    torch.testing.assert_close(torch.cat(logits, dim=-1)[:, :10], F.linear(h, table))


def test_wrong_shape_is_reported_with_both_shapes() -> None:
    layer = ColumnParallelLinear(6, 8)
    with pytest.raises(WeightShapeError, match=r"shape \(8, 5\) does not match the expected \(8, 6\)"):
        layer.weight_loader(layer.weight, torch.randn(8, 5))


def test_sizes_not_divisible_by_tp_are_rejected() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        ColumnParallelLinear(4, 6, tp_group=TensorParallelGroup(0, 4, RecordingCommunicator()))
