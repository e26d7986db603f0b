"""GGUF blocks kept instead of dense weights: which layers keep them, that the dense weights are then
meta (never read, never dequantized), and that the model computes the dense model's logits."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from pagedllm.config import ModelConfig
from pagedllm.errors import ConfigError
from pagedllm.model.loader import load_model
from pagedllm.model.loader.gguf_model import GGUFCheckpoint
from pagedllm.model.loader.packed import resident_weight_bytes
from pagedllm.model.testing import ReferencePlatform, make_tiny_model, prefill_logits, write_tiny_gguf
from pagedllm.ops import OPS
from pagedllm.ops.packed import GGML_MIXED, GGML_Q4_1, GGML_Q8_0, GGML_TYPE_NAMES, PackedWeight, dequantize

IDS = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]
CALLS: list[str] = []  # the formats the stand-in op multiplied, in call order
K_SHAPES = dict(hidden_size=256, intermediate_size=512, head_dim=64)  # rows of whole 256-weight blocks


def _stand_in_packed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedWeight | None
) -> torch.Tensor:
    """Test stand-in for a platform op that multiplies blocks at every row count (the CPU plugin's C
    kernels, until they take every format): computes from the blocks, never from ``weight``."""
    if packed is None:
        return F.linear(x, weight, bias)
    assert weight.is_meta, "a layer with blocks kept its dense weight"
    CALLS.append(packed.type_name)
    return F.linear(x, dequantize(packed), bias)


_stand_in_packed_linear.supports = lambda ggml_type, dtype: dtype == torch.float32  # type: ignore[attr-defined]


@pytest.fixture
def packed_op() -> Iterator[None]:
    previous, owner = OPS.packed_linear, OPS.owner("packed_linear")
    OPS.override("packed_linear", _stand_in_packed_linear, owner="test")
    CALLS.clear()
    yield
    OPS.override("packed_linear", previous, owner)


@pytest.fixture
def native_op() -> Iterator[None]:
    previous, owner = OPS.packed_linear, OPS.owner("packed_linear")
    OPS.override("packed_linear", OPS.default("packed_linear"), owner="native")
    yield
    OPS.override("packed_linear", previous, owner)


def _load(path: str, dtype: str = "float32", quantized_weights: str = "blocks") -> torch.nn.Module:
    config = ModelConfig(model=path, dtype=dtype, quantized_weights=quantized_weights)
    return load_model(config, ReferencePlatform(), 16).model


def _packed_layers(model: torch.nn.Module) -> dict[str, PackedWeight]:
    return {name: m.packed for name, m in model.named_modules() if getattr(m, "packed", None) is not None}


def _linear_names(num_layers: int, head: bool = True) -> set[str]:
    per_layer = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    names = {f"model.layers.{i}.{p}" for i in range(num_layers) for p in per_layer}
    return names | ({"lm_head"} if head else set())


def _gguf(tmp_path, arch: str, quantize, tied: bool | None = None, **shapes) -> str:
    overrides = dict(shapes, **({} if tied is None else {"tie_word_embeddings": tied}))
    hf = make_tiny_model(arch, tmp_path / arch, **overrides)
    return write_tiny_gguf(hf, tmp_path / f"{arch}.gguf", quantize=quantize)


@pytest.mark.parametrize(
    ("arch", "qtype", "shapes"),
    [
        ("llama", "Q4_0", {}),
        ("llama", "Q8_0", {}),
        ("qwen2", "Q4_1", {}),
        ("llama", "Q4_K", K_SHAPES),
        ("qwen2", "Q6_K", K_SHAPES),
        ("llama", "Q5_K", K_SHAPES),
    ],
)
def test_kept_blocks_replace_the_dense_weights_and_equal_them(
    arch, qtype, shapes, tmp_path, packed_op
) -> None:
    # llama: q/k rows permuted by the converter and a tied LM head (the embedding's blocks);
    # qwen2: qkv biases and a separate output matrix.
    path = _gguf(tmp_path, arch, qtype, **shapes)
    model = _load(path)
    dense = _load(path, quantized_weights="dense")
    packed = _packed_layers(model)
    assert set(packed) == _linear_names(2) | {"model.embed_tokens"}
    assert _packed_layers(dense) == {}
    for name, p in packed.items():
        module, reference = model.get_submodule(name), dense.get_submodule(name)
        assert module.weight.is_meta and module.weight.dtype == torch.float32
        assert module.weight.shape == reference.weight.shape
        assert p.type_name == qtype and p.in_features == reference.weight.shape[1]
        # Bit-equal, so the blocks' rows went through the same reordering (q/k un-permutation) as the weights.
        assert torch.equal(dequantize(p), reference.weight), name
    if arch == "llama":  # tied: the head is the embedding, blocks and meta weight alike
        assert model.lm_head.packed is model.model.embed_tokens.packed
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize(
    ("arch", "qtype", "tied", "shapes"),
    [
        ("llama", "Q4_1", True, {}),
        ("llama", "Q8_0", False, {}),
        ("qwen2", "Q8_0", False, {}),
        ("qwen2", "Q4_K", True, K_SHAPES),
        ("llama", "Q6_K", False, K_SHAPES),
        ("gemma2", "Q8_0", None, {}),  # tied, embedding scaled by sqrt(hidden), norms stored as 1 + w
        ("qwen3", "Q5_K", None, {**K_SHAPES, "head_dim": 64}),  # q/k norms
    ],
)
def test_a_model_kept_as_blocks_gives_the_dense_models_logits(
    arch, qtype, tied, shapes, tmp_path, packed_op
) -> None:
    path = _gguf(tmp_path, arch, qtype, tied, **shapes)
    model = _load(path)
    packed_logits = prefill_logits(model, IDS)
    # Every linear layer and the head went through the blocks once (a tied head: the embedding's).
    assert CALLS.count(qtype) == len(_linear_names(2))
    dense_logits = prefill_logits(_load(path, quantized_weights="dense"), IDS)
    assert CALLS.count(qtype) == len(_linear_names(2))  # the dense model has no blocks
    torch.testing.assert_close(packed_logits, dense_logits, atol=1e-5, rtol=1e-5)


def test_weights_kept_as_blocks_shrink_the_resident_weight_bytes(tmp_path, packed_op) -> None:
    path = _gguf(tmp_path, "llama", "Q4_K", **K_SHAPES)
    model, dense = _load(path), _load(path, quantized_weights="dense")
    blocks = sum(p.nbytes for p in {id(p): p for p in _packed_layers(model).values()}.values())
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    assert len(meta) == len(_linear_names(2, head=False)) + 1  # the head is tied: one table
    assert not any(p.is_meta for p in dense.parameters())
    dense_bytes = resident_weight_bytes(dense)
    # Q4_K is 4.5 bits a weight: the quantized matrices shrink 7x; norms stay fp32.
    assert (
        resident_weight_bytes(model)
        == dense_bytes - sum(dense.get_parameter(n).numel() * 4 for n in meta) + blocks
    )
    assert resident_weight_bytes(model) < dense_bytes / 5


def test_kept_tensors_are_never_dequantized(tmp_path, packed_op, monkeypatch) -> None:
    path = _gguf(tmp_path, "qwen2", "Q8_0")
    read: list[str] = []
    original = GGUFCheckpoint._hf_tensor

    def spy(self, name: str):
        read.append(name)
        return original(self, name)

    monkeypatch.setattr(GGUFCheckpoint, "_hf_tensor", spy)
    _load(path)
    assert read and all(
        not n.endswith(("attn_q.weight", "ffn_down.weight", "output.weight", "token_embd.weight"))
        for n in read
    )
    assert all("norm" in n or n.endswith(".bias") for n in read)


def test_the_native_op_gets_no_blocks(tmp_path, native_op) -> None:
    path = _gguf(tmp_path, "llama", "Q4_1")
    model = _load(path)
    assert _packed_layers(model) == {}
    assert not any(p.is_meta for p in model.parameters())


def test_a_dtype_the_op_does_not_support_gets_no_blocks(tmp_path, packed_op) -> None:
    path = _gguf(tmp_path, "llama", "Q4_1")
    assert _packed_layers(_load(path, dtype="bfloat16")) == {}


def test_an_f32_checkpoint_gets_no_blocks(tmp_path, packed_op) -> None:
    path = write_tiny_gguf(make_tiny_model("qwen2", tmp_path / "qwen2"), tmp_path / "f32.gguf")
    assert _packed_layers(_load(path)) == {}


def _mixed_qkv_gguf(tmp_path) -> str:
    """A llama GGUF whose qkv_proj parts differ in format: q Q4_1, k Q8_0, v Q4_1."""
    return write_tiny_gguf(
        make_tiny_model("llama", tmp_path / "llama"),
        tmp_path / "mixed.gguf",
        quantize=lambda name: "Q8_0" if ".k_proj." in name else "Q4_1",
    )


def test_a_fused_layer_whose_parts_differ_in_format_keeps_each_part_as_its_blocks(
    tmp_path, packed_op
) -> None:
    path = _mixed_qkv_gguf(tmp_path)
    model, dense = _load(path), _load(path, quantized_weights="dense")
    packed = _packed_layers(model)
    assert set(packed) == _linear_names(2) | {"model.embed_tokens"}
    for i in range(2):
        name = f"model.layers.{i}.self_attn.qkv_proj"
        qkv = packed[name]
        assert qkv.ggml_type == GGML_MIXED and qkv.type_name == "Q4_1+Q8_0+Q4_1"
        assert [p.out_features for p in qkv.parts] == [64, 32, 32]  # q, k, v rows of the tiny llama
        assert model.get_submodule(name).weight.is_meta
        # Bit-equal to the dense weight: each part's rows in place, q/k un-permuted like the weights.
        assert torch.equal(dequantize(qkv), dense.get_submodule(name).weight)
    torch.testing.assert_close(prefill_logits(model, IDS), prefill_logits(dense, IDS), atol=1e-5, rtol=1e-5)
    assert CALLS.count("Q4_1+Q8_0+Q4_1") == 2


def test_an_op_that_takes_one_format_per_layer_keeps_a_mixed_fused_layer_dense(
    tmp_path, packed_op, monkeypatch
) -> None:
    asked: list[object] = []

    def one_format(ggml_type: object, dtype: torch.dtype) -> bool:
        asked.append(ggml_type)
        return isinstance(ggml_type, int) and dtype == torch.float32

    monkeypatch.setattr(_stand_in_packed_linear, "supports", one_format)
    model = _load(_mixed_qkv_gguf(tmp_path))
    packed = _packed_layers(model)
    assert set(packed) == {n for n in _linear_names(2) if not n.endswith("qkv_proj")} | {"model.embed_tokens"}
    assert {p.type_name for p in packed.values()} == {GGML_TYPE_NAMES[GGML_Q4_1]}
    assert (GGML_Q4_1, GGML_Q8_0, GGML_Q4_1) in asked  # the runs' formats, in row order
    for i in range(2):
        qkv = model.get_submodule(f"model.layers.{i}.self_attn.qkv_proj")
        assert qkv.packed is None and not qkv.weight.is_meta


def test_a_q4_k_m_style_mix_keeps_each_layer_in_its_own_format(tmp_path, packed_op) -> None:
    # llama.cpp's Q4_K_M: Q4_K matrices, Q6_K for v and down (some layers) and the embedding.
    def q4_k_m(name: str) -> str:
        return "Q6_K" if (".v_proj." in name or "down_proj" in name or "embed" in name) else "Q4_K"

    path = write_tiny_gguf(
        make_tiny_model("llama", tmp_path / "llama", **K_SHAPES), tmp_path / "m.gguf", quantize=q4_k_m
    )
    model = _load(path)
    packed = _packed_layers(model)
    kinds = {name: p.type_name for name, p in packed.items()}
    assert kinds["model.embed_tokens"] == kinds["lm_head"] == "Q6_K"
    assert (
        kinds["model.layers.0.mlp.down_proj"] == "Q6_K" and kinds["model.layers.0.mlp.gate_up_proj"] == "Q4_K"
    )
    # q and k: one Q4_K run; v: a Q6_K run. No dense weight anywhere but the norms.
    assert kinds["model.layers.0.self_attn.qkv_proj"] == "Q4_K+Q6_K"
    assert all(p.is_meta for n, p in model.named_parameters() if "norm" not in n)
    torch.testing.assert_close(
        prefill_logits(model, IDS),
        prefill_logits(_load(path, quantized_weights="dense"), IDS),
        atol=1e-5,
        rtol=1e-5,
    )


def test_an_unknown_quantized_weights_mode_is_refused() -> None:
    with pytest.raises(ConfigError, match="quantized_weights must be 'blocks' or 'dense', got 'packed'"):
        ModelConfig(quantized_weights="packed")
