"""The CPU packed_linear / packed_embedding ops: GGUF blocks at every row count for blocks-only layers;
beside a dense weight, blocks for decode-sized fp32 batches and the dense weight everywhere else."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gguf as gguf_package
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pagedllm.config import ModelConfig
from pagedllm.model.loader import load_model
from pagedllm.model.loader.gguf_reader import dequantize
from pagedllm.model.testing import make_tiny_model, prefill_logits, write_tiny_gguf
from pagedllm.plugin import GGML_BLOCK_BYTES, OPS, PackedWeight, PluginRegistry
from pagedllm_cpu import ops as cpu_ops
from pagedllm_cpu.kernels import clib
from pagedllm_cpu.platform import CpuPlatform

Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 8, 12, 13, 14
K_QUANTS = [Q4_K, Q5_K, Q6_K]
ALL_TYPES = [Q4_0, Q4_1, Q8_0, *K_QUANTS]
KERNELS, WHY = clib.status()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason=f"GGUF kernels unavailable: {WHY}")


def _packed(qtype: int, n: int, k: int, seed: int = 0) -> tuple[PackedWeight, torch.Tensor]:
    """Random blocks of ``qtype`` for an [n, k] weight, and their exact fp32 dequantization."""
    rows = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    blocks = gguf_package.quants.quantize(rows, gguf_package.GGMLQuantizationType(qtype))
    dense = dequantize(blocks.reshape(-1), qtype, (n, k))
    return PackedWeight(qtype, torch.from_numpy(blocks), k), dense


def _assert_product(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """y = x w^T + bias to fp32 accuracy: within 1e-5 of the sum of |terms| (fp64 reference)."""
    ref = x.double() @ w.double().T + (bias.double() if bias is not None else 0.0)
    scale = x.double().abs() @ w.double().abs().T + (bias.double().abs() if bias is not None else 0.0)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert bool(((y.double() - ref).abs() <= 1e-5 * scale).all())


@needs_kernels
@pytest.mark.parametrize("qtype", [Q4_0, Q4_1, Q8_0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_gives_the_dense_product_at_every_batch_size(
    qtype: int, with_bias: bool, monkeypatch
) -> None:
    # Up to the row limit the kernel multiplies the blocks; beyond, the panel GEMM the dense weight.
    # The limit raised to 8 (AVX-512's), so the block kernel runs at every size it may be given.
    monkeypatch.setattr(cpu_ops, "PACKED_MAX_ROWS", 8)
    packed, dense = _packed(qtype, 37, 96, seed=qtype)
    gen = torch.Generator().manual_seed(qtype)
    bias = torch.randn(37, generator=gen) if with_bias else None
    for m in [0, *range(1, 10), 17]:
        x = torch.randn(m, 96, generator=gen)
        _assert_product(cpu_ops.packed_linear(x, dense, bias, packed), x, dense, bias)


@needs_kernels
@pytest.mark.parametrize("limit", [None, 3])
def test_packed_linear_uses_the_blocks_only_up_to_the_row_limit(limit: int | None, monkeypatch) -> None:
    # A dense weight that disagrees with the blocks shows which one each batch size multiplied.
    # None: the built kernels' own limit (8 with AVX-512, 1 with AVX2); 3: a set one.
    monkeypatch.setattr(cpu_ops, "PACKED_MAX_ROWS", limit)
    rows = cpu_ops.packed_max_rows()
    assert rows == (KERNELS.gguf_max_rows if limit is None else limit)
    if rows < 1:
        pytest.skip("this build of the kernels never multiplies GGUF blocks")
    packed, dense = _packed(Q4_1, 8, 64)
    decoy = torch.zeros_like(dense)
    small = torch.randn(rows, 64)
    large = torch.randn(rows + 1, 64)
    _assert_product(cpu_ops.packed_linear(small, decoy, None, packed), small, dense, None)
    assert torch.equal(cpu_ops.packed_linear(large, decoy, None, packed), torch.zeros(large.shape[0], 8))


@needs_kernels
def test_the_row_limit_follows_the_instruction_set() -> None:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx512f" in flags:
        assert KERNELS.gguf_max_rows == 8
    elif " avx2" in flags and " fma" in flags:
        assert KERNELS.gguf_max_rows == 1
    else:
        pytest.skip("neither AVX-512 nor AVX2 here: the build's limit is the portable one")


@needs_kernels
def test_a_build_slower_on_blocks_uses_a_dense_weight_when_the_layer_has_one(monkeypatch) -> None:
    monkeypatch.setattr(cpu_ops, "PACKED_MAX_ROWS", 0)
    # the loader may still keep only the blocks (they are multiplied at every row count) ...
    assert cpu_ops.packed_linear.supports(Q4_1, torch.float32)
    packed, dense = _packed(Q4_1, 8, 64)
    x = torch.randn(1, 64)
    # ... but beside a dense weight the blocks are not used: the dense weight is multiplied
    assert torch.equal(cpu_ops.packed_linear(x, torch.zeros_like(dense), None, packed), torch.zeros(1, 8))


def test_packed_linear_of_other_dtypes_uses_the_dense_weight() -> None:
    packed, dense = _packed(Q8_0, 5, 64)
    x, bias = torch.randn(3, 64).bfloat16(), torch.randn(5).bfloat16()
    y = cpu_ops.packed_linear(x, dense.bfloat16(), bias, packed)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x, dense.bfloat16(), bias))


@needs_kernels
def test_packed_linear_of_a_non_contiguous_input_equals_the_contiguous_one() -> None:
    packed, dense = _packed(Q4_0, 37, 64)
    x = torch.randn(64, 4).T  # [4, 64], column-major
    assert not x.is_contiguous()
    y = cpu_ops.packed_linear(x, dense, None, packed)
    assert torch.equal(y, cpu_ops.packed_linear(x.contiguous(), dense, None, packed))
    _assert_product(y, x, dense, None)


def test_packed_linear_without_blocks_is_the_dense_product() -> None:
    # the panel GEMM (or torch without the kernels): the same product, not necessarily the same
    # summation order as torch's BLAS, so compared to fp64 rather than bit for bit
    x, w, bias = torch.randn(3, 64), torch.randn(5, 64), torch.randn(5)
    _assert_product(cpu_ops.packed_linear(x, w, bias, None), x, w, bias)
    _assert_product(cpu_ops.packed_linear(x, w, None, None), x, w, None)


def test_only_fp32_models_keep_blocks() -> None:
    assert not cpu_ops.packed_linear.supports(Q4_1, torch.bfloat16)
    assert not cpu_ops.packed_linear.supports(6, torch.float32)  # Q5_0: no kernel
    for qtype in ALL_TYPES:  # every format the kernels take, whenever they are built
        assert cpu_ops.packed_linear.supports(qtype, torch.float32) == (KERNELS is not None)


def _blocks_only(qtype: int, n: int, k: int, seed: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(blocks, their gguf-py dequantization, the layer's meta-device weight) for a blocks-only layer.

    K-quant blocks are random bytes with sane f16 scales (gguf-py cannot quantize them). A core
    whose PackedWeight does not take K-quants yet gets a stand-in with PackedWeight's fields."""
    rng = np.random.default_rng(seed)
    if qtype in K_QUANTS:
        raw = rng.integers(0, 256, (n * k // 256, clib.TYPE_SIZES[qtype]), dtype=np.uint8)
        scales = (rng.uniform(0.5, 2.0, (raw.shape[0], 2)) * 1e-2).astype(np.float16).view(np.uint8)
        if qtype == Q6_K:
            raw[:, 208:210] = scales[:, :2]
        else:
            raw[:, 0:4] = scales
        data = raw.reshape(n, -1)
    else:
        data = gguf_package.quants.quantize(
            rng.standard_normal((n, k)).astype(np.float32), gguf_package.GGMLQuantizationType(qtype)
        )
    dense = gguf_package.quants.dequantize(data, gguf_package.GGMLQuantizationType(qtype)).reshape(n, k)
    data_t = torch.from_numpy(np.ascontiguousarray(data))
    if qtype in GGML_BLOCK_BYTES:
        packed: Any = PackedWeight(qtype, data_t, k)
    else:
        packed = SimpleNamespace(ggml_type=qtype, data=data_t, in_features=k, out_features=n)
    return packed, torch.from_numpy(np.ascontiguousarray(dense, np.float32)), torch.empty(n, k, device="meta")


@needs_kernels
@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_a_blocks_only_layer_is_multiplied_from_its_blocks_at_every_row_count(qtype: int) -> None:
    k = 512 if qtype in K_QUANTS else 96
    packed, dense, meta = _blocks_only(qtype, 37, k, seed=qtype)
    gen = torch.Generator().manual_seed(qtype)
    bias = torch.randn(37, generator=gen)
    for m in [1, 3, 8, 9, 17, 64, 300]:
        x = torch.randn(m, k, generator=gen)
        y = cpu_ops.packed_linear(x, meta, bias, packed)
        _assert_product(y, x, dense, bias)
        assert torch.equal(cpu_ops.packed_linear(x[:1], meta, bias, packed), y[:1])  # batch-invariant
    x3 = torch.randn(2, 5, k, generator=gen)  # leading dimensions are kept
    assert torch.equal(
        cpu_ops.packed_linear(x3, meta, None, packed),
        cpu_ops.packed_linear(x3.reshape(10, k), meta, None, packed).reshape(2, 5, 37),
    )


@needs_kernels
@pytest.mark.parametrize("with_bias", [False, True])
def test_a_blocks_only_layer_of_parts_in_different_formats_gives_the_dense_product(with_bias: bool) -> None:
    # Q4_K_M's fused qkv_proj: q and k one Q4_K run, v a Q6_K run (here a Q4_K run after it, too).
    runs = [(Q4_K, 24), (Q6_K, 8), (Q4_K, 5)]
    parts = [_blocks_only(t, n, 512, seed=20 + i)[:2] for i, (t, n) in enumerate(runs)]
    packed = PackedWeight.of_parts([p for p, _ in parts])
    dense = torch.cat([d for _, d in parts])  # dequantized: _assert_product's fp64 reference multiplies it
    meta = torch.empty(37, 512, device="meta")
    assert cpu_ops.packed_linear.supports((Q4_K, Q6_K, Q4_K), torch.float32)
    gen = torch.Generator().manual_seed(7)
    bias = torch.randn(37, generator=gen) if with_bias else None
    bounds = [0, 24, 32, 37]
    for m in [1, 3, 8, 9, 17, 64, 300]:
        x = torch.randn(m, 512, generator=gen)
        y = cpu_ops.packed_linear(x, meta, bias, packed)
        _assert_product(y, x, dense, bias)
        assert torch.equal(cpu_ops.packed_linear(x[:1], meta, bias, packed), y[:1])  # batch-invariant
        for (part, _), lo, hi in zip(parts, bounds, bounds[1:], strict=False):  # each part's own product
            part_bias = None if bias is None else bias[lo:hi]
            assert torch.equal(y[:, lo:hi], cpu_ops.packed_linear(x, meta[lo:hi], part_bias, part))


def test_formats_without_a_kernel_keep_a_layer_of_parts_dense() -> None:
    assert not cpu_ops.packed_linear.supports((Q4_K, 6), torch.float32)  # Q5_0: no kernel
    assert not cpu_ops.packed_linear.supports((Q4_K, Q6_K), torch.bfloat16)
    assert cpu_ops.packed_linear.supports((Q4_K, Q6_K), torch.float32) == (KERNELS is not None)


def test_a_blocks_only_layer_that_cannot_be_multiplied_says_why() -> None:
    packed, _, meta = _blocks_only(Q4_1, 8, 64, seed=0)
    with pytest.raises(cpu_ops.PackedWeightUnusable, match="no dense weight.*no blocks"):
        cpu_ops.packed_linear(torch.randn(2, 64), meta, None, None)
    if KERNELS is not None:
        with pytest.raises(cpu_ops.PackedWeightUnusable, match="torch.bfloat16"):
            cpu_ops.packed_linear(torch.randn(2, 64).bfloat16(), meta, None, packed)


@needs_kernels
@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_packed_embedding_dequantizes_the_selected_rows_exactly(qtype: int) -> None:
    k = 512 if qtype in K_QUANTS else 96
    packed, dense, _ = _blocks_only(qtype, 37, k, seed=10 + qtype)
    ids = torch.tensor([[5, 0], [36, 5]])
    out = cpu_ops.packed_embedding(ids, packed)
    assert out.shape == (2, 2, k) and out.dtype == torch.float32
    assert torch.equal(out.view(torch.int32), dense[ids].view(torch.int32))
    with pytest.raises(IndexError, match="outside the 37 rows"):
        cpu_ops.packed_embedding(torch.tensor([37]), packed)


def test_packed_embedding_is_registered_exactly_when_the_core_has_the_op() -> None:
    before = {name: (getattr(OPS, name), OPS.owner(name)) for name in OPS.names()}
    try:
        cpu_ops.register_ops(PluginRegistry())
        if "packed_embedding" in OPS.names():
            assert OPS.packed_embedding is cpu_ops.packed_embedding and OPS.owner("packed_embedding") == "cpu"
        else:
            assert OPS.packed_linear is cpu_ops.packed_linear  # the rest registered all the same
    finally:
        for name, (fn, owner) in before.items():
            OPS.override(name, fn, owner)


@pytest.fixture
def cpu_packed_op() -> Iterator[None]:
    previous, owner = OPS.packed_linear, OPS.owner("packed_linear")
    OPS.override("packed_linear", cpu_ops.packed_linear, owner="cpu")
    yield
    OPS.override("packed_linear", previous, owner)


@needs_kernels
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_q4_1_gguf_decodes_the_same_greedy_ids_with_blocks_as_dense(
    arch: str, tmp_path, cpu_packed_op, monkeypatch
) -> None:
    # llama: permuted q/k blocks, tied LM head; qwen2: qkv biases, its own output matrix.
    monkeypatch.setattr(cpu_ops, "PACKED_MAX_ROWS", 8)
    path = write_tiny_gguf(make_tiny_model(arch, tmp_path / arch), tmp_path / f"{arch}.gguf", quantize="Q4_1")
    model = load_model(ModelConfig(model=path, dtype="float32"), CpuPlatform(), 16).model
    layers = {name: m for name, m in model.named_modules() if getattr(m, "packed", None) is not None}
    assert len(layers) == 2 * 4 + 2  # qkv, o, gate_up, down per layer, the LM head and the embedding

    def greedy(ids: list[int]) -> tuple[list[int], list[torch.Tensor]]:
        # Each step recomputes the whole prefix: 1 to 7 rows, the sizes the kernel takes.
        ids, logits = list(ids), []
        while len(ids) < 8:
            logits.append(prefill_logits(model, ids))
            ids.append(int(logits[-1][-1].argmax()))
        return ids, logits

    packed_ids, packed_logits = greedy([104])
    model = load_model(ModelConfig(model=path, dtype="float32", quantized_weights="dense"), CpuPlatform(), 16).model
    dense_ids, dense_logits = greedy([104])
    assert packed_ids == dense_ids
    for got, want in zip(packed_logits, dense_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _q4_k_m_style(name: str) -> str:
    """llama.cpp's Q4_K_M mix: Q4_K matrices, Q6_K for v, down and the embedding."""
    return "Q6_K" if (".v_proj." in name or "down_proj" in name or "embed" in name) else "Q4_K"


@needs_kernels
def test_a_q4_k_m_style_gguf_keeps_its_mixed_qkv_as_parts_and_gives_the_dense_logits(
    tmp_path, cpu_packed_op
) -> None:
    hf = make_tiny_model("llama", tmp_path / "llama", hidden_size=256, intermediate_size=512, head_dim=64)
    path = write_tiny_gguf(hf, tmp_path / "m.gguf", quantize=_q4_k_m_style)
    model = load_model(ModelConfig(model=path, dtype="float32"), CpuPlatform(), 16).model
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.is_meta and qkv.packed.type_name == "Q4_K+Q6_K"
    assert all(p.is_meta for n, p in model.named_parameters() if "norm" not in n)  # no dense matrix
    ids = [104, 101, 108, 108, 111, 44, 32, 119, 111, 114]
    got = prefill_logits(model, ids)
    dense = load_model(ModelConfig(model=path, dtype="float32", quantized_weights="dense"), CpuPlatform(), 16)
    torch.testing.assert_close(got, prefill_logits(dense.model, ids), atol=1e-4, rtol=1e-4)
    assert torch.equal(prefill_logits(model, ids[:1]), got[:1])  # a row's logits do not depend on its batch
