"""The Llama family decoder (Llama 2/3, Mistral, SmolLM, TinyLlama); Qwen2/Qwen3 reuse it with small switches."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.attention.backend import AttentionSpec
from pagedllm.model.layers import (
    Attention,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    get_act_and_mul,
)
from pagedllm.model.layers.pipeline import MissingLayer
from pagedllm.model.models.base import CausalLM, ModelBuildContext
from pagedllm.ops import OPS


def rope_parameters(config: Any) -> dict[str, Any]:
    """The rotary settings in transformers 5's ``rope_parameters`` form (older configs: rope_theta + rope_scaling)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return dict(params)
    out: dict[str, Any] = dict(getattr(config, "rope_scaling", None) or {})
    out.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    out.setdefault("rope_type", out.pop("type", "default"))
    return out


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_sliding_window(config: Any, layer_idx: int) -> int | None:
    """The window for this layer: per ``layer_types`` when the config has them, else the config's global one."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


def make_rotary(build: ModelBuildContext, rotary_dim: int) -> RotaryEmbedding:
    config = build.hf_config
    params = rope_parameters(config)
    return RotaryEmbedding(
        head_size=head_dim(config),
        rotary_dim=rotary_dim,
        max_position=max(build.max_model_len, 1),
        rope_parameters=params,
        max_position_embeddings=config.max_position_embeddings,
        is_neox_style=True,
        freq_factors=build.rope_freq_factors,
    )


class LlamaMLP(nn.Module):
    def __init__(self, build: ModelBuildContext, bias: bool = False) -> None:
        super().__init__()
        config = build.hf_config
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [inter, inter], bias, tp_group=build.tp
        )
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias, tp_group=build.tp)
        # Gemma names it hidden_activation (older Gemma configs also carry a stale hidden_act).
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
        self.act_fn = get_act_and_mul(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]
        gate_up = self.gate_up_proj
        if getattr(self.act_fn, "fuses_with_linear", False) and not gate_up.gather_output:
            # One op for the projection and SiLU: a platform may fuse them (the CPU's AMX kernel does).
            return self.down_proj(OPS.packed_linear_silu_and_mul(x, gate_up.weight, gate_up.bias, gate_up.packed))
        return self.down_proj(self.act_fn(gate_up(x)))


class LlamaAttention(nn.Module):
    qkv_bias_default = False
    o_bias_default = False

    def __init__(
        self,
        build: ModelBuildContext,
        layer_idx: int,
        rotary: RotaryEmbedding,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool = False,
        scale: float | None = None,
        logit_soft_cap: float | None = None,
    ) -> None:
        super().__init__()
        config = build.hf_config
        self.head_dim = head_dim(config)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            qkv_bias,
            tp_group=build.tp,
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim,
            config.hidden_size,
            o_bias,
            tp_group=build.tp,
            input_partition=(self.qkv_proj.q_head_start * self.head_dim, self.q_size),
        )
        self.rotary_emb = rotary
        if qk_norm:  # Qwen3: RMSNorm over each head's features before rotary
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = qk_norm
        spec = AttentionSpec(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_dim,
            scale=scale if scale is not None else self.head_dim**-0.5,
            dtype=build.dtype,
            block_size=build.block_size,
            sliding_window=layer_sliding_window(config, layer_idx),
            logit_soft_cap=logit_soft_cap,
            kv_cache_dtype=build.kv_cache_dtype,
        )
        # Indexes this stage's KV caches: layers held by earlier pipeline stages come first.
        self.attn = Attention(spec, build.platform, layer_idx - build.stage_layers()[0])

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [T, q + 2 kv]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(-1, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, build: ModelBuildContext, layer_idx: int, rotary: RotaryEmbedding, **attn_kwargs: Any
    ) -> None:
        super().__init__()
        config = build.hf_config
        self.self_attn = LlamaAttention(build, layer_idx, rotary, **attn_kwargs)
        self.mlp = LlamaMLP(build, bias=getattr(config, "mlp_bias", False))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual stream is carried separately so each norm can fuse the preceding add.
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, build: ModelBuildContext, **attn_kwargs: Any) -> None:
        super().__init__()
        config = build.hf_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp_group=build.tp)
        rotary = make_rotary(
            build, int(head_dim(config) * rope_parameters(config).get("partial_rotary_factor", 1.0))
        )
        self.pp = build.pp
        self.start_layer, self.end_layer = start, end = build.stage_layers()
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(build, i, rotary, **attn_kwargs) if start <= i < end else MissingLayer()
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return run_stage(self, self.embed_tokens(input_ids) if self.pp.is_first else None, input_ids, positions)


def run_stage(model: nn.Module, hidden: torch.Tensor | None, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """This pipeline stage's layers: from the embedding (first stage) or the previous stage's activations,
    to the final norm (last stage) or a send to the next stage (whose input is then returned as is)."""
    pp = model.pp
    residual = None
    if hidden is None:
        w = model.norm.weight
        hidden, residual = pp.recv(input_ids, w.shape[0], w.dtype)
    for layer in model.layers[model.start_layer : model.end_layer]:
        hidden, residual = layer(positions, hidden, residual)
    if not pp.is_last:
        pp.send(hidden, residual)
        return hidden
    hidden, _ = model.norm(hidden, residual)
    return hidden


class LlamaForCausalLM(CausalLM):
    """Llama-architecture causal LM; ``load_weights`` maps q/k/v -> qkv_proj and gate/up -> gate_up_proj."""

    qkv_bias: bool | None = None  # None: config.attention_bias
    o_bias: bool | None = None
    qk_norm = False

    def __init__(self, build: ModelBuildContext) -> None:
        super().__init__()
        config = build.hf_config
        self.config = config
        attention_bias = bool(getattr(config, "attention_bias", False))
        self.model = LlamaModel(
            build,
            qkv_bias=attention_bias if self.qkv_bias is None else self.qkv_bias,
            o_bias=attention_bias if self.o_bias is None else self.o_bias,
            qk_norm=self.qk_norm,
        )
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp_group=build.tp)
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] fp32
        return self.lm_head.compute_logits(hidden).float()


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama with a sliding window (taken from the config by each attention layer)."""
