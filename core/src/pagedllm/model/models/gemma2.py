"""Gemma 2: scaled embeddings, (1 + w) norms around both sublayers, soft-capped attention and logits, alternating sliding window."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.model.layers import ParallelLMHead, RMSNorm, VocabParallelEmbedding
from pagedllm.model.models.base import CausalLM, ModelBuildContext
from pagedllm.model.layers.pipeline import MissingLayer
from pagedllm.model.models.llama import LlamaAttention, LlamaMLP, head_dim, make_rotary, run_stage


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, build: ModelBuildContext, layer_idx: int, rotary: nn.Module) -> None:
        super().__init__()
        config = build.hf_config
        bias = bool(getattr(config, "attention_bias", False))
        self.self_attn = LlamaAttention(
            build,
            layer_idx,
            rotary,  # type: ignore[arg-type]
            qkv_bias=bias,
            o_bias=bias,
            scale=config.query_pre_attn_scalar**-0.5,
            logit_soft_cap=getattr(config, "attn_logit_softcapping", None),
        )
        self.mlp = LlamaMLP(build)
        eps, h = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = RMSNorm(h, eps, weight_offset=1.0)
        self.post_attention_layernorm = RMSNorm(h, eps, weight_offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, weight_offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(h, eps, weight_offset=1.0)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma2Model(nn.Module):
    def __init__(self, build: ModelBuildContext) -> None:
        super().__init__()
        config = build.hf_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp_group=build.tp)
        rotary = make_rotary(build, head_dim(config))
        self.pp = build.pp
        self.start_layer, self.end_layer = start, end = build.stage_layers()
        self.layers = nn.ModuleList(
            Gemma2DecoderLayer(build, i, rotary) if start <= i < end else MissingLayer()
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, weight_offset=1.0)
        # HF rounds sqrt(hidden) to the activation dtype before scaling; so do we.
        self.normalizer = float(torch.tensor(config.hidden_size**0.5, dtype=build.dtype))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) * self.normalizer if self.pp.is_first else None  # [T, hidden]
        return run_stage(self, hidden, input_ids, positions)


class Gemma2ForCausalLM(CausalLM):
    def __init__(self, build: ModelBuildContext) -> None:
        super().__init__()
        config = build.hf_config
        self.config = config
        self.model = Gemma2Model(build)
        # Gemma always ties the head to the embedding.
        self.tie_word_embeddings = True
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp_group=build.tp)
        self.lm_head.tie_to(self.model.embed_tokens)
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] fp32
        logits = self.lm_head.compute_logits(hidden).float()
        if self.final_logit_softcapping:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits
