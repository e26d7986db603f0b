"""The core's torch dequantization of every kept block format equals gguf-py's, bit for bit in fp32."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from pagedllm.ops import OPS
from pagedllm.ops.packed import (
    GGML_BLOCK_BYTES,
    GGML_BLOCK_WEIGHTS,
    GGML_TYPE_NAMES,
    PackedWeight,
    dequantize,
    dequantize_rows,
)
from pagedllm.plugin import dequantize as plugin_dequantize

# Byte offsets of each format's f16 scale fields (d, and dmin / m where there is one).
F16_FIELDS = {2: (0,), 3: (0, 2), 8: (0,), 12: (0, 2), 13: (0, 2), 14: (208,)}


def random_blocks(ggml_type: int, rows: int, blocks_per_row: int, seed: int) -> np.ndarray:
    """Random quants, sub-scales and bits, with finite f16 scales of both signs (uint8 [rows, bytes])."""
    rng = np.random.default_rng(seed)
    size = GGML_BLOCK_BYTES[ggml_type]
    blocks = rng.integers(0, 256, size=(rows * blocks_per_row, size), dtype=np.uint8)
    for off in F16_FIELDS[ggml_type]:
        scale = rng.uniform(-2.0, 2.0, size=(blocks.shape[0], 1)) * 10.0 ** rng.integers(
            -6, 2, size=(blocks.shape[0], 1)
        )
        blocks[:, off : off + 2] = scale.astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, blocks_per_row * size)


@pytest.mark.parametrize("ggml_type", sorted(GGML_TYPE_NAMES), ids=lambda t: GGML_TYPE_NAMES[t])
def test_dequantize_equals_gguf_py_bit_for_bit(ggml_type: int) -> None:
    raw = random_blocks(ggml_type, rows=7, blocks_per_row=3, seed=ggml_type)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(ggml_type))  # fp32 [7, 3 * block]
    packed = PackedWeight(ggml_type, torch.from_numpy(raw.copy()), 3 * GGML_BLOCK_WEIGHTS[ggml_type])
    got = dequantize(packed)
    assert got.dtype == torch.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.numpy().view(np.uint32), want.view(np.uint32))
    assert torch.equal(plugin_dequantize(packed), got)  # the same function through the plugin API


def test_dequantize_in_chunks_writes_every_row(monkeypatch) -> None:
    import pagedllm.ops.packed as packed_module

    raw = torch.from_numpy(random_blocks(14, rows=5, blocks_per_row=2, seed=1).copy())
    whole = dequantize_rows(raw, 14, 512)
    monkeypatch.setattr(packed_module, "_CHUNK_BYTES", 210 * 3)  # three blocks a pass: chunks split rows
    assert torch.equal(dequantize_rows(raw, 14, 512), whole)


@pytest.mark.parametrize("ggml_type", sorted(GGML_TYPE_NAMES), ids=lambda t: GGML_TYPE_NAMES[t])
def test_packed_embedding_dequantizes_only_the_selected_rows(ggml_type: int) -> None:
    raw = random_blocks(ggml_type, rows=9, blocks_per_row=2, seed=5)
    packed = PackedWeight(ggml_type, torch.from_numpy(raw.copy()), 2 * GGML_BLOCK_WEIGHTS[ggml_type])
    ids = torch.tensor([8, 0, 3, 3], dtype=torch.int64)
    got = OPS.default("packed_embedding")(ids, packed)
    assert torch.equal(got, dequantize(packed)[ids])
    assert OPS.default("packed_embedding")(ids[:0], packed).shape == (0, packed.in_features)


def test_the_native_packed_linear_supports_no_format_but_never_computes_on_a_meta_weight() -> None:
    native = OPS.default("packed_linear")
    assert not any(native.supports(t, torch.float32) for t in GGML_TYPE_NAMES)
    packed = PackedWeight(
        12, torch.from_numpy(random_blocks(12, rows=3, blocks_per_row=1, seed=2).copy()), 256
    )
    x = torch.randn(2, 256)
    y = native(x, torch.empty(3, 256, device="meta"), None, packed)
    assert not y.is_meta
    torch.testing.assert_close(y, x @ dequantize(packed).T)


def test_rows_that_do_not_match_in_features_are_refused() -> None:
    with pytest.raises(ValueError, match="are not 300 columns"):
        dequantize_rows(torch.zeros(2, 144, dtype=torch.uint8), 12, 300)
    with pytest.raises(ValueError, match="GGML type 6 is not a packable block format"):
        dequantize_rows(torch.zeros(2, 22, dtype=torch.uint8), 6, 32)


def test_a_matrix_of_parts_dequantizes_each_part_into_its_rows_and_the_native_op_multiplies_it() -> None:
    parts = [
        PackedWeight(t, torch.from_numpy(random_blocks(t, rows=r, blocks_per_row=1, seed=t).copy()), 256)
        for t, r in ((12, 5), (14, 3), (12, 2))  # Q4_K, Q6_K, Q4_K
    ]
    packed = PackedWeight.of_parts(parts)
    want = torch.cat([dequantize(p) for p in parts])
    assert torch.equal(dequantize(packed), want) and torch.equal(plugin_dequantize(packed), want)
    native = OPS.default("packed_linear")
    assert not native.supports((12, 14), torch.float32)
    x = torch.randn(4, 256)
    torch.testing.assert_close(native(x, torch.empty(10, 256, device="meta"), None, packed), x @ want.T)
