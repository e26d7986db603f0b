"""Tensor-parallel linear layers: column-split (optionally fused QKV / gate-up) and row-split with all-reduce."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.model.layers.parallel_state import TensorParallelGroup, resolve_tp
from pagedllm.model.layers.weight_utils import check_shape, divide
from pagedllm.ops import OPS
from pagedllm.ops.packed import PackedWeight


def _param(*shape: int) -> nn.Parameter:
    # Device and dtype come from the loader's build context (torch.device / default dtype).
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows: rank r holds rows [r*out/tp, (r+1)*out/tp)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        gather_output: bool = False,
        tp_rank: int | None = None,
        tp_size: int | None = None,
        tp_group: TensorParallelGroup | None = None,
        output_size_per_partition: int | None = None,  # uneven splits (QKV by KV-head groups)
    ) -> None:
        super().__init__()
        self.tp = resolve_tp(tp_rank, tp_size, tp_group)
        self.input_size = input_size
        self.output_size = output_size
        self.gather_output = gather_output
        self.output_size_per_partition = (
            divide(output_size, self.tp.size) if output_size_per_partition is None else output_size_per_partition
        )
        self.weight = _param(self.output_size_per_partition, input_size)  # [out / tp, in]
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        if bias:
            self.bias = _param(self.output_size_per_partition)
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)
        # The checkpoint's quantized blocks, attached by the loader when the platform can use them.
        self.packed: PackedWeight | None = None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        check_shape(loaded, (self.output_size, *param.shape[1:]))
        n = self.output_size_per_partition
        param.data.copy_(loaded.narrow(0, self.tp.rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = OPS.packed_linear(x, self.weight, self.bias, self.packed)  # [T, out / tp]
        return self.tp.all_gather(y, dim=-1) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul (gate/up)."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        tp_rank: int | None = None,
        tp_size: int | None = None,
        tp_group: TensorParallelGroup | None = None,
    ) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, False, tp_rank, tp_size, tp_group)
        for size in self.output_sizes:
            divide(size, self.tp.size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is None:  # an already fused checkpoint tensor: split it into its parts
            check_shape(loaded, (self.output_size, *param.shape[1:]))
            for i, part in enumerate(loaded.split(self.output_sizes, dim=0)):
                self.weight_loader(param, part, i)
            return
        assert isinstance(shard_id, int)
        size = self.output_sizes[shard_id]
        check_shape(loaded, (size, *param.shape[1:]))
        per_rank = size // self.tp.size
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        param.data.narrow(0, offset, per_rank).copy_(loaded.narrow(0, self.tp.rank * per_rank, per_rank))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k and v projections; heads are split across ranks, KV heads replicated when tp > num_kv_heads."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = False,
        tp_rank: int | None = None,
        tp_size: int | None = None,
        tp_group: TensorParallelGroup | None = None,
    ) -> None:
        tp = resolve_tp(tp_rank, tp_size, tp_group)
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.kv_replicas = 1
        if tp.size >= total_num_kv_heads:
            self.num_heads = divide(total_num_heads, tp.size)
            self.num_kv_heads = 1
            self.kv_replicas = divide(tp.size, total_num_kv_heads)
            self.q_head_start, self.kv_head_start = tp.rank * self.num_heads, tp.rank // self.kv_replicas
        elif total_num_kv_heads % tp.size == 0:
            self.num_heads = divide(total_num_heads, tp.size)
            self.num_kv_heads = total_num_kv_heads // tp.size
            self.q_head_start, self.kv_head_start = tp.rank * self.num_heads, tp.rank * self.num_kv_heads
        else:
            # KV heads that do not split evenly (SmolLM2-135M: 3 of them over 2 ranks): ranks take
            # whole KV-head groups, as even as they go, each with the query heads that share them.
            group = total_num_heads // total_num_kv_heads
            if group * total_num_kv_heads != total_num_heads:
                raise ValueError(f"{total_num_heads} heads do not form groups over {total_num_kv_heads} KV heads")
            base, extra = divmod(total_num_kv_heads, tp.size)
            self.num_kv_heads = base + (1 if tp.rank < extra else 0)
            self.kv_head_start = tp.rank * base + min(tp.rank, extra)
            self.num_heads, self.q_head_start = self.num_kv_heads * group, self.kv_head_start * group
        self.q_size = self.num_heads * head_size  # per rank
        self.kv_size = self.num_kv_heads * head_size  # per rank
        output_size = (total_num_heads + 2 * total_num_kv_heads) * head_size
        super().__init__(
            hidden_size, output_size, bias, False, tp_group=tp, output_size_per_partition=self.q_size + 2 * self.kv_size
        )

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        tail = tuple(param.shape[1:])
        if shard_id is None:  # an already fused checkpoint tensor
            q, kv = self.total_num_heads * self.head_size, self.total_num_kv_heads * self.head_size
            check_shape(loaded, (q + 2 * kv, *tail))
            for sid, part in zip("qkv", loaded.split([q, kv, kv], dim=0), strict=True):
                self.weight_loader(param, part, sid)
            return
        if shard_id == "q":
            check_shape(loaded, (self.total_num_heads * self.head_size, *tail))
            dst_offset, size, src_offset = 0, self.q_size, self.q_head_start * self.head_size
        elif shard_id in ("k", "v"):
            check_shape(loaded, (self.total_num_kv_heads * self.head_size, *tail))
            size = self.kv_size
            dst_offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            src_offset = self.kv_head_start * self.head_size
        else:
            raise ValueError(f"unknown qkv shard {shard_id!r}")
        param.data.narrow(0, dst_offset, size).copy_(loaded.narrow(0, src_offset, size))


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns; partial sums are all-reduced, bias added once after."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp_rank: int | None = None,
        tp_size: int | None = None,
        tp_group: TensorParallelGroup | None = None,
        input_partition: tuple[int, int] | None = None,  # (offset, size) of an uneven split
    ) -> None:
        super().__init__()
        self.tp = resolve_tp(tp_rank, tp_size, tp_group)
        self.input_size = input_size
        self.output_size = output_size
        if input_partition is None:
            self.input_size_per_partition = divide(input_size, self.tp.size)
            self.input_offset = self.tp.rank * self.input_size_per_partition
        else:
            self.input_offset, self.input_size_per_partition = input_partition
        self.weight = _param(output_size, self.input_size_per_partition)  # [out, in / tp]
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        if bias:
            self.bias = _param(output_size)
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)
        # The checkpoint's quantized blocks, attached by the loader when the platform can use them.
        self.packed: PackedWeight | None = None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.dim() == 1:  # bias: replicated
            check_shape(loaded, tuple(param.shape))
            param.data.copy_(loaded)
            return
        check_shape(loaded, (self.output_size, self.input_size))
        param.data.copy_(loaded.narrow(1, self.input_offset, self.input_size_per_partition))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return OPS.packed_linear(x, self.weight, self.bias, self.packed)
        y = self.tp.all_reduce(OPS.packed_linear(x, self.weight, None, None))
        return y + self.bias if self.bias is not None else y
