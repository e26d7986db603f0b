"""Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm): the Llama decoder with two switches."""

from __future__ import annotations

from pagedllm.model.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
    o_bias = False


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
