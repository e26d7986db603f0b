"""TokenizerInfo: the tokenizer and its facts, made by the loader and shared by the engine and the frontend.

It lives here, outside ``pagedllm.model`` (whose loader imports torch), so that the API server's
process can unpickle the one the engine process sends without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class TokenizerInfo:
    tokenizer: PreTrainedTokenizerBase  # HF tokenizer (fast)
    chat_template: str | None
    eos_token_ids: list[int]  # from generation_config / GGUF / tokenizer
    bos_token_id: int | None
    max_model_len: int  # the model's context (min with ModelConfig.max_model_len)
    vocab_size: int
    generation_defaults: dict = field(default_factory=dict)  # generation_config.json sampling defaults
    model_name: str = ""  # what /v1/models shows by default
