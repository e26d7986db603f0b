"""Test helpers other suites reuse: tiny random HF checkpoints of each architecture and a reference platform.

Everything here is built offline from transformers config classes with a fixed seed.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from typing import Any

import torch

from pagedllm.attention.backend import AttentionBackend, AttentionSpec
from pagedllm.attention.reference import ReferenceAttentionBackend
from pagedllm.platforms.platform import Platform

TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2")

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


class ReferencePlatform(Platform):
    """A CPU platform that always uses the core's reference attention backend (tests only)."""

    name = "reference"
    device_type = "cpu"
    dist_backend = "gloo"
    supported_dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def device_count(self) -> int:
        return 1

    def device_name(self, index: int = 0) -> str:
        return "cpu"

    def total_memory(self, index: int = 0) -> int:
        return 8 << 30

    def free_memory(self, index: int = 0) -> int:
        return 4 << 30

    def attention_backend(self, spec: AttentionSpec) -> AttentionBackend:
        return ReferenceAttentionBackend(spec)


def tiny_config(arch: str, **overrides: Any) -> Any:
    """A small transformers config: hidden 64, 2 layers, 4 heads, 2 KV heads, byte-level vocab of 259."""
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=256 + len(SPECIAL_TOKENS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=256,  # <|endoftext|>
        pad_token_id=256,
    )
    if arch == "llama":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=True)
    elif arch == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=6, tie_word_embeddings=False)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=False)
    elif arch == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    elif arch == "gemma2":
        config = transformers.Gemma2Config(
            **common,
            head_dim=16,
            sliding_window=5,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,  # small caps so the soft-capping visibly changes the result
            final_logit_softcapping=3.0,
            hidden_activation="gelu_pytorch_tanh",
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(TINY_ARCHITECTURES)}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer (256 byte tokens + ChatML specials, no merges): any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_map = bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(256)}
    for i, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = 256 + i
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_tiny_model(arch: str, path: str | os.PathLike, seed: int = 0, **config_overrides: Any) -> str:
    """Save a random tiny ``arch`` model (weights, config, tokenizer, generation config) into ``path``."""
    import transformers

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    config = tiny_config(arch, **config_overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Default init (std 0.02) makes every layer nearly the identity; larger weights exercise the math.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.randn_like(param) * 0.1 + (0.0 if arch == "gemma2" else 1.0))
            elif param.dim() >= 2:
                param.normal_(0.0, 0.15)
            else:
                param.normal_(0.0, 0.05)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token_id": [256, 258], "temperature": 0.7, "top_p": 0.9}, f)
    return path


def write_tiny_gguf(
    hf_dir: str | os.PathLike,
    path: str | os.PathLike,
    quantize: str | Callable[[str], str | None] | None = None,
) -> str:
    """Convert a tiny HF checkpoint (llama, qwen2, qwen3 or gemma2) to a GGUF the way llama.cpp does.

    Applies llama.cpp's conversion-time changes (q/k row permutation for llama, +1 on Gemma norms)
    so the loader's undoing of them is tested against the original HF weights. Tensors are F32
    unless ``quantize`` names a GGML block type ("Q4_0", "Q4_1", "Q8_0", ...) for every matrix
    whose rows are whole blocks, or is a function of the HF tensor name giving one (None: F32).
    K-quants ("Q4_K", "Q5_K", "Q6_K"; rows of 256) get random blocks (``random_k_blocks``), not
    the HF weights: gguf-py cannot quantize them.
    """
    import gguf
    import numpy as np
    import transformers
    from safetensors.torch import load_file

    from pagedllm.model.loader.gguf_model import (
        _BLOCK_NAMES,
        _GEMMA2_BLOCK_NAMES,
        _GLOBAL_NAMES,
        GGUF_ARCHITECTURES,
    )

    hf_dir, path = os.fspath(hf_dir), os.fspath(path)
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    arch = {v[0]: k for k, v in GGUF_ARCHITECTURES.items()}[config.architectures[0]]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "llama3":
        # llama.cpp bakes Llama 3 scaling into per-frequency divisors instead of metadata.
        writer.add_tensor("rope_freqs.weight", _llama3_rope_freqs(rope, head_dim))
    if arch == "gemma2":
        writer.add_sliding_window(config.sliding_window)
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3 = CONTROL
    # No merges (a byte-level vocabulary); zero scores let transformers derive that empty merge list.
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_eos_token_id(
        config.eos_token_id if isinstance(config.eos_token_id, int) else config.eos_token_id[0]
    )
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    inverse_global = {v: k for k, v in _GLOBAL_NAMES.items()}
    inverse_block = {v: k for k, v in (_GEMMA2_BLOCK_NAMES if arch == "gemma2" else _BLOCK_NAMES).items()}
    for name, tensor in load_file(os.path.join(hf_dir, "model.safetensors")).items():
        stem, suffix = name.rsplit(".", 1)
        if stem in inverse_global:
            gguf_name = f"{inverse_global[stem]}.{suffix}"
        else:
            _, _, layer, rest = stem.split(".", 3)
            gguf_name = f"blk.{layer}.{inverse_block[rest]}.{suffix}"
        w = tensor.float()
        if arch == "llama" and rest_is(name, "q_proj"):
            w = _permute_rotary(w, heads)
        elif arch == "llama" and rest_is(name, "k_proj"):
            w = _permute_rotary(w, kv_heads)
        elif arch == "gemma2" and name.endswith("norm.weight"):
            w = w + 1.0
        qtype = quantize(name) if callable(quantize) else quantize
        ggml_type = gguf.GGMLQuantizationType[qtype] if qtype is not None else None
        if ggml_type is not None and w.dim() == 2 and w.shape[-1] % gguf.GGML_QUANT_SIZES[ggml_type][0] == 0:
            if ggml_type in _K_QUANT_SCALES:  # gguf-py cannot quantize these: random blocks instead
                blocks = random_k_blocks(tuple(w.shape), int(ggml_type), seed=zlib.crc32(name.encode()))
            else:
                blocks = gguf.quants.quantize(np.ascontiguousarray(w.numpy()), ggml_type)  # uint8 [rows, bytes]
            writer.add_tensor(gguf_name, blocks, raw_shape=blocks.shape, raw_dtype=ggml_type)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(w.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# GGML K-quant type -> (block bytes, byte offset of its f16 scale(s), the f16 scale): scales that give
# weights of about the tiny models' size (0.1-0.3) from random quants and 6-bit / int8 sub-scales.
_K_QUANT_SCALES = {12: (144, (0, 2), 2e-4), 13: (176, (0, 2), 1e-4), 14: (210, (208,), 5e-5)}


def random_k_blocks(shape: tuple[int, int], ggml_type: int, seed: int = 0) -> Any:
    """Random Q4_K / Q5_K / Q6_K blocks for a [rows, cols] matrix (uint8 numpy [rows, bytes]) with sane
    f16 scales (random f16 bytes would include inf and NaN)."""
    import numpy as np

    type_size, scale_offsets, scale = _K_QUANT_SCALES[ggml_type]
    rng = np.random.default_rng(seed)
    n_blocks = shape[0] * shape[1] // 256
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in scale_offsets:
        d = (rng.uniform(0.5, 1.5, size=(n_blocks, 1)) * scale).astype(np.float16)
        blocks[:, off : off + 2] = d.view(np.uint8)
    return blocks.reshape(shape[0], -1)


def rest_is(name: str, proj: str) -> bool:
    return f".{proj}." in name


def _permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the inverse of the loader's)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def prefill_logits(model: torch.nn.Module, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Run one whole-prompt prefill through a loaded model with fresh KV caches; logits [len(ids), vocab]."""
    from pagedllm.attention.backend import AttentionBatch
    from pagedllm.model.forward_context import ForwardContext, set_forward_context

    layers = model.attention_layers()  # type: ignore[operator]
    num_blocks = -(-len(ids) // block_size)
    caches = [layer.backend.allocate_kv_cache(num_blocks, "cpu") for layer in layers]
    batch = AttentionBatch.build([len(ids)], [len(ids)], [list(range(num_blocks))], block_size)
    metadata = layers[0].backend.build_metadata(batch)
    with torch.no_grad(), set_forward_context(ForwardContext(metadata, caches)):
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids))))  # type: ignore[operator]


def tensor_parallel_prefill_worker(
    rank: int, world_size: int, port: int, jobs: list[tuple[str, list[int], str]]
) -> None:
    """A spawned rank: joins a gloo group, loads each (model path) sharded, saves its prefill logits to the out path."""
    import torch.distributed as dist

    from pagedllm.config import ModelConfig
    from pagedllm.model.loader import load_model

    os.environ["PAGEDLLM_NO_PROGRESS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        for path, ids, out in jobs:
            model = load_model(
                ModelConfig(model=path), ReferencePlatform(), 4, tp_rank=rank, tp_size=world_size
            ).model
            torch.save(prefill_logits(model, ids, block_size=4), f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def _llama3_rope_freqs(rope: dict[str, Any], head_dim: int) -> Any:
    """llama.cpp's convert_hf_to_gguf ``rope_freqs`` for Llama 3 scaling, written out as it does."""
    import math

    import numpy as np

    base, factor = rope["rope_theta"], rope["factor"]
    low, high, old = (
        rope["low_freq_factor"],
        rope["high_freq_factor"],
        rope["original_max_position_embeddings"],
    )
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / base ** (i / head_dim))
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)
