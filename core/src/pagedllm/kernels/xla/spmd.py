"""Tensor parallelism on XLA through SPMD sharding annotations (GSPMD), in one process.

torch-xla's SPMD mode runs one program over every device of a mesh: the model is built whole,
its weights and KV caches are annotated with how they split over the mesh's ``model`` axis, and
XLA's partitioner divides each graph and inserts the collectives (over ICI on a TPU). The
annotations follow Megatron's split, as the core's tensor-parallel layers do across processes:
column-parallel weights (QKV, gate-up) by output rows, row-parallel weights (o_proj, down) by
input columns, the vocabulary of the embedding and LM head by rows, the KV caches by KV head.
Annotations change where data lives, never what a graph computes, so the tokens equal one
device's. Only the last reduction order can differ (the partial sums of row-parallel layers).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pagedllm.errors import ConfigError

AXIS = "model"


def enable(tp_size: int, device_count: int) -> Any:
    """Turn SPMD on (process-wide, irreversible) and return a (replicas, tp) mesh over every device.

    torch-xla's mesh must span all devices: with more devices than tp_size, each tp-sized group
    holds one copy of the sharded model (the ``replica`` axis carries no split).
    """
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    if tp_size > device_count or device_count % tp_size:
        raise ConfigError(
            f"tensor_parallel_size {tp_size} must divide the {device_count} XLA devices of this runtime"
            " (on XLA:CPU, start with CPU_NUM_DEVICES set to the size)",
            param="tensor_parallel_size",
        )
    if not xr.is_spmd():
        xr.use_spmd()
    return xs.Mesh(np.arange(device_count), (device_count // tp_size, tp_size), ("replica", AXIS))


def _spec(module: nn.Module, name: str, param: torch.Tensor) -> tuple[str | None, ...] | None:
    """How one parameter splits over the model axis; None: replicated."""
    from pagedllm.model.layers.linear import ColumnParallelLinear, RowParallelLinear
    from pagedllm.model.layers.vocab_embedding import VocabParallelEmbedding

    if isinstance(module, ColumnParallelLinear):  # QKV and gate-up too (subclasses)
        return (AXIS, None) if name == "weight" else (AXIS,)
    if isinstance(module, RowParallelLinear):
        return (None, AXIS) if name == "weight" else None  # the bias is added once, after the reduction
    if isinstance(module, VocabParallelEmbedding) and name == "weight":  # and the LM head
        return (AXIS, None)
    return None


def shard_model(model: nn.Module, kv_caches: list[torch.Tensor], mesh: Any) -> int:
    """Annotate the model's weights and the KV caches on ``mesh``; returns how many tensors were split.

    Any weight may split unevenly (9 query heads over 2 devices): XLA pads the last shard.
    """
    import torch_xla.distributed.spmd as xs

    done: set[int] = set()  # tied weights (embedding and LM head) are annotated once
    split = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            spec = _spec(module, name, param)
            if spec is None or id(param) in done:
                continue
            done.add(id(param))
            xs.mark_sharding(param, mesh, spec)
            split += 1
    for cache in kv_caches:  # [2, slots, kv_heads, head_size]: by KV head
        xs.mark_sharding(cache, mesh, (None, None, AXIS, None))
        split += 1
    return split


def sharding_of(tensor: torch.Tensor) -> str:
    """torch-xla's description of a tensor's sharding ('' when replicated or unannotated)."""
    import torch_xla

    return torch_xla._XLAC._get_xla_sharding_spec(tensor)
