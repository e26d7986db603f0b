"""Attach a GGUF checkpoint's quantized blocks to the linear layers whose platform op can use them.

Runs after the dense weights are loaded. A fused layer (qkv_proj, gate_up_proj) gets blocks only
when all its parts are stored in the same supported format; anything else keeps its dense weight
alone. Tensor-parallel ranks keep dense weights (the blocks are not sharded).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from pagedllm.model.layers.linear import ColumnParallelLinear, RowParallelLinear
from pagedllm.model.layers.vocab_embedding import ParallelLMHead
from pagedllm.model.loader.gguf_model import GGUFCheckpoint
from pagedllm.model.models.base import _SHARDS, _hf_name
from pagedllm.ops import OPS
from pagedllm.ops.packed import GGML_BLOCK_BYTES, GGML_TYPE_NAMES, PackedWeight

logger = logging.getLogger(__name__)


def _checkpoint_names(module_name: str, module: torch.nn.Module, tied: bool) -> list[str]:
    """The HF checkpoint tensors that make up this module's weight, in row order."""
    if isinstance(module, ParallelLMHead):
        return ["model.embed_tokens.weight" if tied else "lm_head.weight"]
    param = f"{module_name}.weight"
    owner = module_name.rsplit(".", 1)[-1]
    return [_hf_name(param, shard) for shard in _SHARDS.get(owner, (None,))]


def attach_packed_weights(model: torch.nn.Module, ckpt: GGUFCheckpoint, dtype: torch.dtype) -> Counter[str]:
    """Give each eligible linear layer its PackedWeight; returns how many layers got each format."""
    supports = getattr(OPS.packed_linear, "supports", None)
    attached: Counter[str] = Counter()
    if supports is None:
        return attached
    gguf_names = ckpt.hf_to_gguf_names()
    tied = bool(getattr(model, "tie_word_embeddings", False))
    for name, module in model.named_modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)):
            continue
        if module.tp.size != 1:
            continue
        parts = [gguf_names.get(n) for n in _checkpoint_names(name, module, tied)]
        if any(p is None for p in parts):
            continue
        blocks = [ckpt.blocks(p) for p in parts if p is not None]
        types = {t for t, _ in blocks}
        if len(types) != 1:
            continue
        ggml_type = types.pop()
        if ggml_type not in GGML_BLOCK_BYTES or not supports(ggml_type, dtype):
            continue
        data = torch.cat([rows for _, rows in blocks]) if len(blocks) > 1 else blocks[0][1]
        weight = module.weight
        if data.shape[0] < weight.shape[0]:  # a vocabulary padded for tensor parallelism: not at tp 1
            continue
        module.packed = PackedWeight(ggml_type, data.contiguous(), int(weight.shape[1]))
        attached[GGML_TYPE_NAMES[ggml_type]] += 1
    if attached:
        logger.info(
            "kept GGUF blocks for %s linear layers (op %s by %s)",
            ", ".join(f"{n} {t}" for t, n in sorted(attached.items())),
            "packed_linear",
            OPS.owner("packed_linear"),
        )
    return attached
