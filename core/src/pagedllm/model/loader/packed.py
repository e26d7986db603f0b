"""Keep a GGUF checkpoint's quantized blocks, instead of dense weights, where the platform can use them.

Runs before the dense weights are read. A layer whose checkpoint tensor is in a block format the
platform's ``packed_linear`` supports (``supports(ggml_type, dtype)``: it multiplies the blocks at
every row count) gets the blocks as ``packed`` and a meta ``weight`` (fp32 [out, in], no storage);
the loader then never reads or dequantizes that tensor. The token embedding's blocks are read
through ``OPS.packed_embedding``; a tied LM head multiplies the same blocks. A fused layer
(qkv_proj, gate_up_proj) whose parts share one format gets one block matrix; one whose parts
differ (Q4_K_M's Q4_K q/k beside a Q6_K v) gets a PackedWeight of parts, one per run of a format,
if ``supports`` says yes to the tuple of the runs' formats (an op that cannot take parts says no,
and the layer stays dense). Every tensor-parallel rank (the blocks are not sharded) keeps dense weights.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from itertools import groupby
from operator import itemgetter

import torch
from torch import nn

from pagedllm.model.layers.linear import ColumnParallelLinear, RowParallelLinear
from pagedllm.model.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.model.loader.gguf_model import GGUFCheckpoint
from pagedllm.model.models.base import _SHARDS, _hf_name
from pagedllm.ops import OPS
from pagedllm.ops.packed import GGML_BLOCK_BYTES, GGML_BLOCK_WEIGHTS, PackedWeight

logger = logging.getLogger(__name__)

_EMBEDDING = "model.embed_tokens.weight"


@dataclass(slots=True)
class KeptBlocks:
    """What ``keep_blocks`` did: the GGUF tensors now held as blocks and the layers per format."""

    gguf_names: set[str] = field(default_factory=set)
    layers: Counter[str] = field(default_factory=Counter)
    nbytes: int = 0  # the blocks' bytes
    dense_nbytes: int = 0  # what the same weights take dense, at the model dtype


def _checkpoint_names(module_name: str, module: nn.Module) -> list[str]:
    """The HF checkpoint tensors that make up this module's weight, in row order."""
    if isinstance(module, ParallelLMHead):
        return ["lm_head.weight"]
    if isinstance(module, VocabParallelEmbedding):
        return [_EMBEDDING]
    param = f"{module_name}.weight"
    owner = module_name.rsplit(".", 1)[-1]
    return [_hf_name(param, shard) for shard in _SHARDS.get(owner, (None,))]


def _meta_like(weight: torch.Tensor) -> nn.Parameter:
    """The contract's stand-in for a weight kept as blocks: fp32, same shape, no storage."""
    return nn.Parameter(torch.empty(weight.shape, dtype=torch.float32, device="meta"), requires_grad=False)


def keep_blocks(model: nn.Module, ckpt: GGUFCheckpoint, dtype: torch.dtype) -> KeptBlocks:
    """Give each eligible layer its PackedWeight and a meta weight; returns what was kept."""
    kept = KeptBlocks()
    supports = getattr(OPS.packed_linear, "supports", None)
    if supports is None:
        return kept
    gguf_names = ckpt.hf_to_gguf_names()
    tied = bool(getattr(model, "tie_word_embeddings", False))
    replaced: dict[int, tuple[nn.Parameter, PackedWeight]] = {}  # id(old weight) -> (meta weight, blocks)
    for name, module in model.named_modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            continue
        if module.tp.size != 1 or (isinstance(module, ParallelLMHead) and tied):
            continue  # a tied head takes the embedding's blocks below
        parts = [gguf_names.get(n) for n in _checkpoint_names(name, module)]
        if any(p is None for p in parts):
            continue
        names = [p for p in parts if p is not None]
        # Runs of consecutive parts in one format: one run is the whole matrix, as it always was.
        runs = [
            (t, [n for n, _ in group])
            for t, group in groupby(((n, ckpt.block_type(n)) for n in names), itemgetter(1))
        ]
        types = tuple(t for t, _ in runs)
        weight = module.weight
        if (
            weight.dim() != 2
            or any(t not in GGML_BLOCK_BYTES or weight.shape[1] % GGML_BLOCK_WEIGHTS[t] for t in types)
            or sum(ckpt.file.rows(p) for p in names) != weight.shape[0]
            or not supports(types[0] if len(types) == 1 else types, dtype)
        ):
            continue
        in_features = int(weight.shape[1])
        packed = PackedWeight.of_parts(
            [PackedWeight(t, ckpt.blocks(run, weight.device), in_features) for t, run in runs]
        )
        replaced[id(weight)] = (_meta_like(weight), packed)
        kept.gguf_names.update(names)
        kept.layers[packed.type_name] += 1
        kept.nbytes += packed.nbytes
        kept.dense_nbytes += weight.numel() * weight.element_size()
    # Swap every module's reference to a kept weight, so a tied head follows its embedding.
    for module in model.modules():
        current = getattr(module, "weight", None)
        if isinstance(current, torch.Tensor) and id(current) in replaced:
            meta, packed = replaced[id(current)]
            module.weight = meta
            module.packed = packed  # type: ignore[assignment]
    return kept


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights hold: dense parameters and buffers (not meta ones) plus kept blocks, each once."""
    seen: set[int] = set()
    total = 0
    tensors = [t for t in model.state_dict(keep_vars=True).values() if not t.is_meta]
    tensors += [
        p.data for m in model.modules() if getattr(m, "packed", None) is not None for p in m.packed.runs
    ]
    for t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def log_kept(kept: KeptBlocks, model: nn.Module) -> None:
    if not kept.layers:
        return
    logger.info(
        "kept GGUF blocks for %s layers (%.1f MiB; %.1f MiB dense); weights resident: %.1f MiB (op packed_linear by %s)",
        ", ".join(f"{n} {t}" for t, n in sorted(kept.layers.items())),
        kept.nbytes / 2**20,
        kept.dense_nbytes / 2**20,
        resident_weight_bytes(model) / 2**20,
        OPS.owner("packed_linear"),
    )
