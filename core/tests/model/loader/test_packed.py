"""Packed GGUF weights: which layers the loader gives blocks to, and that the blocks are the dense weights."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from pagedllm.config import ModelConfig
from pagedllm.model.loader import load_model
from pagedllm.model.loader.gguf_reader import dequantize
from pagedllm.model.testing import ReferencePlatform, make_tiny_model, prefill_logits, write_tiny_gguf
from pagedllm.ops import OPS
from pagedllm.ops.packed import GGML_Q4_1, GGML_TYPE_NAMES, PackedWeight

IDS = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]
CALLS: list[str] = []  # the formats the test op multiplied, in call order


def _dense(
    packed: PackedWeight,
) -> torch.Tensor:  # [out_features, in_features] fp32, the core's dequantization
    raw = packed.data.numpy().reshape(-1)
    return dequantize(raw, packed.ggml_type, (packed.out_features, packed.in_features))


def _torch_packed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedWeight | None
) -> torch.Tensor:
    """A platform op that really multiplies by the blocks (dequantized here), never by ``weight``."""
    if packed is None:
        return F.linear(x, weight, bias)
    CALLS.append(packed.type_name)
    y = x @ _dense(packed).T
    return y + bias if bias is not None else y


_torch_packed_linear.supports = lambda ggml_type, dtype: dtype == torch.float32  # type: ignore[attr-defined]


@pytest.fixture
def packed_op() -> Iterator[None]:
    previous, owner = OPS.packed_linear, OPS.owner("packed_linear")
    OPS.override("packed_linear", _torch_packed_linear, owner="test")
    CALLS.clear()
    yield
    OPS.override("packed_linear", previous, owner)


@pytest.fixture
def native_op() -> Iterator[None]:
    previous, owner = OPS.packed_linear, OPS.owner("packed_linear")
    OPS.override("packed_linear", OPS.default("packed_linear"), owner="native")
    yield
    OPS.override("packed_linear", previous, owner)


def _load(path: str, dtype: str = "float32") -> torch.nn.Module:
    return load_model(ModelConfig(model=path, dtype=dtype), ReferencePlatform(), 16).model


def _packed_layers(model: torch.nn.Module) -> dict[str, PackedWeight]:
    return {name: m.packed for name, m in model.named_modules() if getattr(m, "packed", None) is not None}


def _linear_names(num_layers: int) -> set[str]:
    per_layer = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    return {f"model.layers.{i}.{p}" for i in range(num_layers) for p in per_layer} | {"lm_head"}


@pytest.mark.parametrize(("arch", "qtype"), [("llama", "Q4_0"), ("llama", "Q8_0"), ("qwen2", "Q4_1")])
def test_supported_blocks_are_attached_to_every_linear_layer_and_equal_its_dense_weight(
    arch: str, qtype: str, tmp_path, packed_op
) -> None:
    # llama: q/k rows permuted by the converter and a tied LM head (the embedding's blocks);
    # qwen2: qkv biases and a separate output matrix.
    path = write_tiny_gguf(make_tiny_model(arch, tmp_path / arch), tmp_path / f"{arch}.gguf", quantize=qtype)
    model = _load(path)
    packed = _packed_layers(model)
    assert set(packed) == _linear_names(2)
    for name, p in packed.items():
        module = model.get_submodule(name)
        assert p.type_name == qtype and p.in_features == module.weight.shape[1]
        # Bit-equal, so the blocks' rows went through the same reordering (q/k un-permutation) as the weights.
        assert torch.equal(_dense(p), module.weight), name


@pytest.mark.parametrize(("arch", "qtype"), [("llama", "Q4_1"), ("qwen2", "Q8_0")])
def test_prefill_through_the_packed_op_gives_the_dense_logits(
    arch: str, qtype: str, tmp_path, packed_op
) -> None:
    path = write_tiny_gguf(make_tiny_model(arch, tmp_path / arch), tmp_path / f"{arch}.gguf", quantize=qtype)
    model = _load(path)
    packed_logits = prefill_logits(model, IDS)
    assert CALLS.count(qtype) == len(_linear_names(2))  # every linear layer went through the blocks once
    for module in model.modules():
        if getattr(module, "packed", None) is not None:
            module.packed = None
    dense_logits = prefill_logits(model, IDS)
    assert CALLS.count(qtype) == len(_linear_names(2))
    torch.testing.assert_close(packed_logits, dense_logits, atol=1e-5, rtol=1e-5)


def test_the_native_op_gets_no_blocks(tmp_path, native_op) -> None:
    path = write_tiny_gguf(make_tiny_model("llama", tmp_path / "llama"), tmp_path / "q.gguf", quantize="Q4_1")
    assert _packed_layers(_load(path)) == {}


def test_a_dtype_the_op_does_not_support_gets_no_blocks(tmp_path, packed_op) -> None:
    path = write_tiny_gguf(make_tiny_model("llama", tmp_path / "llama"), tmp_path / "q.gguf", quantize="Q4_1")
    assert _packed_layers(_load(path, dtype="bfloat16")) == {}


def test_an_f32_checkpoint_gets_no_blocks(tmp_path, packed_op) -> None:
    path = write_tiny_gguf(make_tiny_model("qwen2", tmp_path / "qwen2"), tmp_path / "f32.gguf")
    assert _packed_layers(_load(path)) == {}


def test_a_fused_layer_whose_parts_differ_in_format_stays_dense(tmp_path, packed_op) -> None:
    path = write_tiny_gguf(
        make_tiny_model("llama", tmp_path / "llama"),
        tmp_path / "mixed.gguf",
        quantize=lambda name: "Q8_0" if ".k_proj." in name else "Q4_1",
    )
    model = _load(path)
    packed = _packed_layers(model)
    assert set(packed) == {n for n in _linear_names(2) if not n.endswith("qkv_proj")}
    assert {p.type_name for p in packed.values()} == {GGML_TYPE_NAMES[GGML_Q4_1]}
    assert all(model.get_submodule(f"model.layers.{i}.self_attn.qkv_proj").packed is None for i in range(2))
