"""What every model class shares: its build context and HF-name -> fused-parameter weight loading."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from pagedllm.errors import ModelLoadError
from pagedllm.model.layers.attention import Attention
from pagedllm.model.layers.parallel_state import TensorParallelGroup
from pagedllm.model.layers.pipeline import MissingLayer, PipelineStage
from pagedllm.model.layers.weight_utils import WeightShapeError, default_weight_loader

if TYPE_CHECKING:
    from pagedllm.platforms.platform import Platform

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ModelBuildContext:
    """Everything a model class needs at construction; a plugin's model class receives the same."""

    hf_config: Any
    platform: Platform
    block_size: int
    dtype: torch.dtype  # weights, activations and (unless kv_cache_dtype) KV cache
    max_model_len: int  # rotary caches are sized to it
    tp: TensorParallelGroup = field(default_factory=TensorParallelGroup)
    rope_freq_factors: torch.Tensor | None = None  # GGUF rope_freqs (llama.cpp's Llama 3 scaling)
    pp: PipelineStage = field(default_factory=PipelineStage)
    kv_cache_dtype: torch.dtype | None = None  # --kv-cache-dtype; None: dtype

    def stage_layers(self) -> tuple[int, int]:
        """[start, end) of the decoder layers this pipeline stage builds (all of them without PP)."""
        return self.pp.layers(self.hf_config.num_hidden_layers)


# (fused parameter, HF projection, shard id): checkpoints store q/k/v and gate/up separately.
STACKED_PARAMS: tuple[tuple[str, str, object], ...] = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)
_SHARDS = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": (0, 1)}


class CausalLM(nn.Module):
    """Base of decoder-only models: ``forward``, ``compute_logits``, ``attention_layers``, ``load_weights``."""

    # Checkpoint tensors that carry nothing we compute with (recomputed rotary tables).
    ignored_weight_suffixes: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)
    tie_word_embeddings: bool = False

    def attention_layers(self) -> list[Attention]:
        layers = [m for m in self.modules() if isinstance(m, Attention)]
        return sorted(layers, key=lambda a: a.layer_idx)

    def _held_by_another_stage(self, name: str) -> bool:
        """A decoder layer's tensor whose layer another pipeline stage builds."""
        i = _layer_of(name)
        layers = getattr(getattr(self, "model", None), "layers", None)
        return i is not None and layers is not None and i < len(layers) and isinstance(layers[i], MissingLayer)

    def _kept_as_blocks(self, name: str) -> bool:
        try:
            return self.get_parameter(name).is_meta
        except AttributeError:
            return False

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into (fused, sharded) parameters; every parameter must be filled exactly,
        except meta ones (weights the loader keeps as quantized blocks, see loader/packed.py)."""
        params = {name: p for name, p in self.named_parameters() if not p.is_meta}
        loaded: set[tuple[str, object]] = set()
        for hf_name, tensor in weights:
            if hf_name.endswith(self.ignored_weight_suffixes):
                continue
            if self.tie_word_embeddings and hf_name == "lm_head.weight":
                continue  # the embedding table is the head; a saved copy adds nothing
            name, shard = _fused_name(hf_name)
            param = params.get(name)
            if param is None and (self._held_by_another_stage(name) or self._kept_as_blocks(name)):
                continue
            if param is None:
                logger.warning("ignoring checkpoint tensor %s: the model has no such parameter", hf_name)
                continue
            loader = getattr(param, "weight_loader", None)
            try:
                if loader is None:
                    default_weight_loader(param, tensor)
                elif shard is None:
                    loader(param, tensor)
                else:
                    loader(param, tensor, shard)
            except WeightShapeError as e:
                raise ModelLoadError(f"tensor {hf_name}: {e}") from None
            if shard is None and _owner(name) in _SHARDS:
                loaded.update((name, s) for s in _SHARDS[_owner(name)])  # a pre-fused tensor
            else:
                loaded.add((name, shard))
        missing = [
            _hf_name(name, shard)
            for name in params
            for shard in _SHARDS.get(_owner(name), (None,))
            if (name, shard) not in loaded
        ]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ModelLoadError(f"missing tensor {', '.join(missing[:5])}{more} in the checkpoint")
        return {name for name, _ in loaded}


def _layer_of(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def _owner(param_name: str) -> str:
    """The name of the module holding a parameter: "model.layers.0.self_attn.qkv_proj.weight" -> "qkv_proj"."""
    parts = param_name.split(".")
    return parts[-2] if len(parts) > 1 else ""


def _fused_name(hf_name: str) -> tuple[str, object]:
    for fused, part, shard in STACKED_PARAMS:
        if f".{part}." in hf_name:
            return hf_name.replace(f".{part}.", f".{fused}."), shard
    return hf_name, None


def _hf_name(name: str, shard: object) -> str:
    for fused, part, s in STACKED_PARAMS:
        if s == shard and f".{fused}." in name:
            return name.replace(f".{fused}.", f".{part}.")
    return name
