"""Tokenizer loading (HF directory or GGUF metadata) into the TokenizerInfo the frontend and engine share."""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

from pagedllm.errors import ConfigError, ModelLoadError
from pagedllm.model.loader.source import ModelSource
from pagedllm.tokenizer_info import TokenizerInfo

if TYPE_CHECKING:
    from pagedllm.config import ModelConfig
    from pagedllm.model.loader.gguf_model import GGUFCheckpoint

logger = logging.getLogger(__name__)

# generation_config.json keys that are sampling defaults (vLLM's set); max_new_tokens becomes max_tokens.
_GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def effective_max_model_len(requested: int | None, model_max: int) -> int:
    """The user's max_model_len if the model supports it, else the model's; too large is an error."""
    if requested is None:
        return model_max
    if requested > model_max:
        raise ConfigError(
            f"max_model_len {requested} exceeds the model's {model_max}; pass --max-model-len {model_max} or less",
            param="max_model_len",
        )
    return requested


def model_max_len(hf_config: Any) -> int:
    """The longest context the config supports (rope scaling that extends it included, as vLLM derives it)."""
    max_len = getattr(hf_config, "max_position_embeddings", None)
    if max_len is None:
        max_len = getattr(hf_config, "max_sequence_length", None) or 2048
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type")) if isinstance(params, dict) else None
    if rope_type in ("linear", "yarn", "dynamic") and params.get("factor"):
        base = params.get("original_max_position_embeddings") or max_len
        max_len = max(max_len, int(base * params["factor"]))
    return int(max_len)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _dedupe(ids: list[int]) -> list[int]:
    return list(dict.fromkeys(ids))


def _chat_template_override(value: str | None) -> str | None:
    """ModelConfig.chat_template may be the template itself or a path to a file holding it."""
    if value is not None and os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value


def _tokenizer_chat_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default") or next(iter(template.values()), None)
    return template


def load_hf_tokenizer(path: str) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {e}") from None


def tokenizer_info_from_hf(source: ModelSource, model_config: ModelConfig, hf_config: Any) -> TokenizerInfo:
    tokenizer = load_hf_tokenizer(model_config.tokenizer or source.path)
    generation: dict[str, Any] = {}
    gen_path = os.path.join(source.path, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path, encoding="utf-8") as f:
            generation = json.load(f)
    eos = _dedupe(
        _ids(generation.get("eos_token_id"))
        + _ids(getattr(hf_config, "eos_token_id", None))
        + _ids(tokenizer.eos_token_id)
    )
    bos = generation.get("bos_token_id", getattr(hf_config, "bos_token_id", None))
    if bos is None:
        bos = tokenizer.bos_token_id
    return TokenizerInfo(
        tokenizer=tokenizer,
        chat_template=_chat_template_override(model_config.chat_template)
        or _tokenizer_chat_template(tokenizer),
        eos_token_ids=eos,
        bos_token_id=int(bos) if isinstance(bos, int) else None,
        max_model_len=effective_max_model_len(model_config.max_model_len, model_max_len(hf_config)),
        vocab_size=int(getattr(hf_config, "vocab_size", len(tokenizer))),
        generation_defaults={
            k: generation[k] for k in _GENERATION_DEFAULT_KEYS if generation.get(k) is not None
        },
        model_name=model_config.served_model_name or source.name,
    )


def load_gguf_tokenizer(ckpt: GGUFCheckpoint) -> Any:
    """The HF fast tokenizer the GGUF metadata describes (what transformers builds for ``gguf_file=``)."""
    try:
        return _gguf_tokenizer_from_metadata(ckpt)
    except (ImportError, AttributeError, TypeError):
        # transformers moved or changed its GGUF helpers: fall back to its public (slower) path.
        import transformers

        directory, name = os.path.split(ckpt.path)
        return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)


def _gguf_tokenizer_from_metadata(ckpt: GGUFCheckpoint) -> Any:
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    meta = ckpt.metadata
    grouped = {
        group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in tokenizer_dict:
        raise ModelLoadError(f"{ckpt.path} has no tokenizer (tokenizer.ggml.tokens is missing)")
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault(
            "add_bos_token", True
        )  # llama.cpp's default for sentencepiece vocabularies
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(ckpt.arch, tokenizer_dict)
    except ValueError as e:
        raise ModelLoadError(f"cannot build the tokenizer of {ckpt.path}: {e}") from None
    tokenizer_config.update(extra)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config)


def tokenizer_info_from_gguf(
    source: ModelSource, model_config: ModelConfig, ckpt: GGUFCheckpoint, hf_config: Any
) -> TokenizerInfo:
    tokenizer = (
        load_hf_tokenizer(model_config.tokenizer) if model_config.tokenizer else load_gguf_tokenizer(ckpt)
    )
    meta = ckpt.metadata
    eos = _dedupe(
        _ids(meta.get("tokenizer.ggml.eos_token_id")) + _ids(meta.get("tokenizer.ggml.eot_token_id"))
    )
    if not eos:
        eos = _ids(tokenizer.eos_token_id)
    template = meta.get("tokenizer.chat_template") or _tokenizer_chat_template(tokenizer)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return TokenizerInfo(
        tokenizer=tokenizer,
        chat_template=_chat_template_override(model_config.chat_template) or template,
        eos_token_ids=eos,
        bos_token_id=int(bos) if bos is not None else None,
        max_model_len=effective_max_model_len(model_config.max_model_len, model_max_len(hf_config)),
        vocab_size=int(hf_config.vocab_size),
        generation_defaults={},
        model_name=model_config.served_model_name or source.name,
    )
