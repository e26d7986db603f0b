"""Building blocks of the model graph: tensor-parallel linears, embeddings, norms, rotary, activations, attention."""

from pagedllm.model.layers.activation import GeluTanhAndMul, SiluAndMul, get_act_and_mul
from pagedllm.model.layers.attention import Attention
from pagedllm.model.layers.layernorm import RMSNorm
from pagedllm.model.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedllm.model.layers.parallel_state import TensorParallelGroup, get_tp_group, set_tp_group
from pagedllm.model.layers.rotary_embedding import RotaryEmbedding, rope_inv_freq
from pagedllm.model.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.model.layers.weight_utils import WeightShapeError

__all__ = [
    "Attention",
    "ColumnParallelLinear",
    "GeluTanhAndMul",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "RowParallelLinear",
    "SiluAndMul",
    "TensorParallelGroup",
    "VocabParallelEmbedding",
    "WeightShapeError",
    "get_act_and_mul",
    "get_tp_group",
    "rope_inv_freq",
    "set_tp_group",
]
