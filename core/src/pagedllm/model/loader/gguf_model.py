"""A GGUF checkpoint as the loader needs it: an HF-style config, HF-named weights and a fast tokenizer."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Any

import torch

from pagedllm.errors import ModelLoadError
from pagedllm.model.loader.gguf_reader import GGUFFile

# GGUF general.architecture -> (HF architectures name, transformers model_type)
GGUF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 2 has norms before and after both sublayers; llama.cpp names them differently.
_GEMMA2_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
ROPE_FREQS = "rope_freqs.weight"


class GGUFCheckpoint:
    """One GGUF file: ``arch``, ``hf_config()``, ``weights()`` (HF names, fp32) and ``tokenizer()``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file = GGUFFile(path)
        self.metadata = self.file.metadata
        self.arch = str(self.metadata.get("general.architecture", ""))
        if self.arch not in GGUF_ARCHITECTURES:
            from pagedllm.model.models import supported_architectures

            raise ModelLoadError(
                f"unsupported GGUF architecture {self.arch!r} in {path}; supported GGUF architectures: "
                f"{', '.join(sorted(GGUF_ARCHITECTURES))} (HF architectures: {', '.join(supported_architectures())})"
            )

    def _key(self, name: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.arch}.{name}", default)

    def _required(self, name: str) -> Any:
        value = self._key(name)
        if value is None:
            raise ModelLoadError(f"{self.path}: GGUF metadata key {self.arch}.{name} is missing")
        return value

    @property
    def context_length(self) -> int:
        return int(self._required("context_length"))

    def hf_config(self) -> Any:
        """A transformers config equivalent to the GGUF metadata."""
        import transformers

        architecture, model_type = GGUF_ARCHITECTURES[self.arch]
        hidden = int(self._required("embedding_length"))
        heads = int(self._required("attention.head_count"))
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        vocab = self._key("vocab_size") or (len(tokens) if tokens is not None else None)
        if vocab is None and "token_embd.weight" in self.file.tensors:
            vocab = self.file.tensors["token_embd.weight"].shape[0]
        head_dim = int(
            self._key("attention.key_length") or self._key("rope.dimension_count") or hidden // heads
        )
        rope: dict[str, Any] = {
            "rope_type": "default",
            "rope_theta": float(self._key("rope.freq_base", 10000.0)),
        }
        scaling = self._key("rope.scaling.type")
        if scaling in ("linear", "yarn"):
            rope["rope_type"] = scaling
            rope["factor"] = float(self._required("rope.scaling.factor"))
            if scaling == "yarn":
                rope["original_max_position_embeddings"] = int(
                    self._required("rope.scaling.original_context_length")
                )
        kwargs: dict[str, Any] = dict(
            architectures=[architecture],
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self._required("feed_forward_length")),
            num_hidden_layers=int(self._required("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(self._key("attention.head_count_kv") or heads),
            head_dim=head_dim,
            max_position_embeddings=self.context_length,
            rms_norm_eps=float(self._key("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_parameters=rope,
            tie_word_embeddings="output.weight" not in self.file.tensors,
            bos_token_id=self.metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=self.metadata.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=self.metadata.get("tokenizer.ggml.padding_token_id"),
        )
        if self.arch == "qwen2":
            kwargs.pop("head_dim")
        if self.arch == "gemma2":
            scale = self._key("attention.scale")
            if scale:
                query_pre_attn_scalar: float = 1.0 / float(scale) ** 2
            else:
                # llama.cpp scales queries by 1/sqrt(head_dim), except 27B (46 layers) by 1/sqrt(hidden/heads).
                query_pre_attn_scalar = hidden // heads if kwargs["num_hidden_layers"] == 46 else head_dim
            kwargs.update(
                sliding_window=self._key("attention.sliding_window"),
                attn_logit_softcapping=self._key("attn_logit_softcapping"),
                final_logit_softcapping=self._key("final_logit_softcapping"),
                query_pre_attn_scalar=query_pre_attn_scalar,
            )
        return transformers.AutoConfig.for_model(model_type, **kwargs)

    def rope_freq_factors(self) -> torch.Tensor | None:
        """llama.cpp stores Llama 3's rope scaling as per-frequency divisors in ``rope_freqs.weight``."""
        return self.file.load_tensor(ROPE_FREQS) if ROPE_FREQS in self.file.tensors else None

    def tensor_names(self) -> list[str]:
        return [n for n in self.file.tensors if n != ROPE_FREQS]

    def hf_name(self, gguf_name: str) -> str:
        stem, _, suffix = gguf_name.rpartition(".")
        if stem in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[stem]}.{suffix}"
        m = _BLOCK_RE.match(gguf_name)
        table = _GEMMA2_BLOCK_NAMES if self.arch == "gemma2" else _BLOCK_NAMES
        if m is None or m.group(2) not in table:
            raise ModelLoadError(f"unknown tensor {gguf_name} in GGUF file {self.path}")
        return f"model.layers.{m.group(1)}.{table[m.group(2)]}.{m.group(3)}"

    def weights(
        self, num_workers: int = 1, skip: Collection[str] = ()
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, dequantized tensor) pairs in file order, with llama.cpp's conversion-time changes undone.

        With ``num_workers > 1`` tensors are dequantized ahead on a thread pool (torch ops release the GIL).
        Tensors named in ``skip`` (GGUF names: kept as blocks) are not read.
        """
        names = [n for n in self.tensor_names() if n not in skip]
        if num_workers <= 1:
            yield from map(self._hf_tensor, names)
            return
        with ThreadPoolExecutor(num_workers) as pool:
            pending: deque[Future[tuple[str, torch.Tensor]]] = deque()
            queue = iter(names)
            for name in islice(queue, 2 * num_workers):  # bounded look-ahead keeps memory small
                pending.append(pool.submit(self._hf_tensor, name))
            while pending:
                result = pending.popleft().result()
                for name in islice(queue, 1):
                    pending.append(pool.submit(self._hf_tensor, name))
                yield result

    def hf_to_gguf_names(self) -> dict[str, str]:
        return {self.hf_name(n): n for n in self.tensor_names()}

    def block_type(self, gguf_name: str) -> int:
        return self.file.tensors[gguf_name].ggml_type

    def blocks(self, gguf_names: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """The named tensors' raw rows stacked in order, uint8 ``[rows, bytes per row]``, with the same
        row reordering as ``weights()``; read straight into one buffer (a fused layer's parts)."""
        rows = [self.file.rows(n) for n in gguf_names]
        widths = {self.file.row_bytes(n) for n in gguf_names}
        if len(widths) != 1:
            raise ModelLoadError(f"{self.path}: tensors {', '.join(gguf_names)} differ in bytes per row")
        out = torch.empty(sum(rows), widths.pop(), dtype=torch.uint8)
        for name, part in zip(gguf_names, out.split(rows), strict=True):
            heads = self._permuted_heads(name)
            if heads is None:
                self.file.load_blocks(name, part)
            else:
                part.copy_(unpermute_rotary(self.file.load_blocks(name)[1], heads))
        return out if torch.device(device).type == "cpu" else out.to(device)

    def _permuted_heads(self, name: str) -> int | None:
        """The head count llama.cpp's converter permuted this tensor's rows over (None: not permuted)."""
        if self.arch == "llama" and ".attn_q." in name:
            return self._heads
        if self.arch == "llama" and ".attn_k." in name:
            return self._kv_heads
        return None

    def _hf_tensor(self, name: str) -> tuple[str, torch.Tensor]:
        tensor = self.file.load_tensor(name)
        heads = self._permuted_heads(name)
        if heads is not None:
            tensor = unpermute_rotary(tensor, heads)
        elif self.arch == "gemma2" and name.endswith("norm.weight"):
            tensor = tensor - 1.0  # llama.cpp stores Gemma's (1 + w)
        return self.hf_name(name), tensor

    @property
    def _heads(self) -> int:
        return int(self._required("attention.head_count"))

    @property
    def _kv_heads(self) -> int:
        return int(self._key("attention.head_count_kv") or self._heads)


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (HF's rotate-half layout -> GPT-J interleaved pairs)."""
    rows = w.shape[0]
    if rows % (2 * n_head) != 0:
        raise ModelLoadError(f"cannot unpermute a q/k tensor of {rows} rows over {n_head} heads")
    return (
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()
    )
