"""PackedWeight refuses data that cannot be a layer's GGUF blocks, saying what it expected; parts in
different formats make one matrix."""

from __future__ import annotations

import pytest
import torch
from pagedllm.plugin import GGML_MIXED, PackedWeight

Q4_0, Q4_1, Q8_0 = 2, 3, 8


def test_rows_that_are_not_whole_blocks_are_refused() -> None:
    with pytest.raises(ValueError, match=r"Q4_1 data must be contiguous uint8 \[rows, 40\], got torch.uint8 \(4, 39\)"):
        PackedWeight(Q4_1, torch.zeros(4, 39, dtype=torch.uint8), 64)
    with pytest.raises(ValueError, match="in_features 48 is not a whole number of 32-weight blocks"):
        PackedWeight(Q8_0, torch.zeros(4, 51, dtype=torch.uint8), 48)


def test_data_that_is_not_uint8_rows_is_refused() -> None:
    with pytest.raises(ValueError, match=r"got torch.int8 \(4, 18\)"):
        PackedWeight(Q4_0, torch.zeros(4, 18, dtype=torch.int8), 32)
    with pytest.raises(ValueError, match=r"got torch.uint8 \(72,\)"):
        PackedWeight(Q4_0, torch.zeros(72, dtype=torch.uint8), 32)


def test_a_format_without_packed_support_is_refused() -> None:
    with pytest.raises(ValueError, match="GGML type 6 is not a packable block format"):
        PackedWeight(6, torch.zeros(4, 22, dtype=torch.uint8), 32)


def test_valid_blocks_report_their_shape_and_format() -> None:
    packed = PackedWeight(Q4_1, torch.zeros(5, 40, dtype=torch.uint8), 64)
    assert (packed.out_features, packed.in_features, packed.type_name) == (5, 64, "Q4_1")


def test_blocks_that_are_not_contiguous_are_refused() -> None:
    wide = torch.zeros(4, 80, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\(4, 40\) \(not contiguous\)"):
        PackedWeight(Q4_1, wide[:, :40], 64)


@pytest.mark.parametrize(("ggml_type", "name"), [(12, "Q4_K"), (13, "Q5_K"), (14, "Q6_K")])
def test_k_quant_rows_must_be_whole_256_weight_blocks(ggml_type: int, name: str) -> None:
    block_bytes = {12: 144, 13: 176, 14: 210}[ggml_type]
    with pytest.raises(ValueError, match=f"in_features 288 is not a whole number of 256-weight blocks \\({name}\\)"):
        PackedWeight(ggml_type, torch.zeros(4, block_bytes, dtype=torch.uint8), 288)
    packed = PackedWeight(ggml_type, torch.zeros(3, 2 * block_bytes, dtype=torch.uint8), 512)
    assert (packed.out_features, packed.in_features, packed.type_name, packed.nbytes) == (3, 512, name, 6 * block_bytes)


def test_parts_in_different_formats_make_one_matrix_of_their_rows() -> None:
    q4_k = PackedWeight(12, torch.zeros(3, 288, dtype=torch.uint8), 512)
    q6_k = PackedWeight(14, torch.zeros(2, 420, dtype=torch.uint8), 512)
    packed = PackedWeight.of_parts([q4_k, q6_k])
    assert packed.ggml_type == GGML_MIXED and packed.parts == (q4_k, q6_k) and packed.runs == (q4_k, q6_k)
    assert (packed.out_features, packed.in_features, packed.type_name) == (5, 512, "Q4_K+Q6_K")
    assert packed.nbytes == 3 * 288 + 2 * 420 and packed.data.numel() == 0
    assert PackedWeight.of_parts([q4_k]) is q4_k and q4_k.runs == (q4_k,)  # one format: the matrix itself


def test_parts_of_other_widths_or_nested_parts_are_refused() -> None:
    q4_1 = PackedWeight(Q4_1, torch.zeros(2, 40, dtype=torch.uint8), 64)
    q8_0 = PackedWeight(Q8_0, torch.zeros(2, 68, dtype=torch.uint8), 64)
    narrow = PackedWeight(Q8_0, torch.zeros(2, 34, dtype=torch.uint8), 32)
    with pytest.raises(
        ValueError, match="each part must be one format of 64 columns, got Q8_0 of 32 columns"
    ):
        PackedWeight.of_parts([q4_1, narrow])
    with pytest.raises(ValueError, match="each part must be one format"):
        PackedWeight.of_parts([q4_1, PackedWeight.of_parts([q4_1, q8_0])])
    with pytest.raises(ValueError, match="at least two parts"):
        PackedWeight(GGML_MIXED, torch.zeros(2, 0, dtype=torch.uint8), 64, (q4_1,))
    with pytest.raises(ValueError, match=r"empty uint8 data \[4, 0\], got \(4, 40\)"):
        PackedWeight(GGML_MIXED, torch.zeros(4, 40, dtype=torch.uint8), 64, (q4_1, q8_0))
