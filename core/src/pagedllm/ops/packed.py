"""Weights kept in a checkpoint's quantized blocks beside their dense dequantization.

A GGUF checkpoint stores most matrices as blocks of 32 weights (Q4_0, Q4_1, Q8_0, ...). The
loader always fills a layer's dense ``weight`` with the exact dequantized values, so every
platform can run every model. When the active ``packed_linear`` op says it can multiply a block
format directly (``supports``), the loader also attaches the raw blocks to the layer as a
``PackedWeight``; the op then reads 5-8.5 bits per weight instead of 16-32 where that is faster
(a decode step reads every weight once), and falls back to the dense weight elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# GGML type ids of the block formats a plugin may support, with the bytes of one 32-weight block.
GGML_Q4_0, GGML_Q4_1, GGML_Q8_0 = 2, 3, 8
GGML_BLOCK_BYTES = {GGML_Q4_0: 18, GGML_Q4_1: 20, GGML_Q8_0: 34}
GGML_TYPE_NAMES = {GGML_Q4_0: "Q4_0", GGML_Q4_1: "Q4_1", GGML_Q8_0: "Q8_0"}
GGML_BLOCK = 32  # weights per block, along the input dimension


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A linear layer's [out_features, in_features] weight as GGUF blocks, one row per output feature.

    ``data`` is uint8 ``[out_features, in_features // 32 * block_bytes]``: row r holds output
    feature r's blocks in input order, byte for byte as in the GGUF file (after the loader's
    row reordering, e.g. llama.cpp's q/k permutation undone).
    """

    ggml_type: int
    data: torch.Tensor
    in_features: int

    def __post_init__(self) -> None:
        block_bytes = GGML_BLOCK_BYTES.get(self.ggml_type)
        if block_bytes is None:
            raise ValueError(f"GGML type {self.ggml_type} is not a packable block format")
        if self.in_features % GGML_BLOCK:
            raise ValueError(f"in_features {self.in_features} is not a whole number of {GGML_BLOCK}-weight blocks")
        expected = self.in_features // GGML_BLOCK * block_bytes
        if (
            self.data.dtype != torch.uint8
            or self.data.dim() != 2
            or self.data.shape[1] != expected
            or not self.data.is_contiguous()
        ):
            raise ValueError(
                f"packed {GGML_TYPE_NAMES[self.ggml_type]} data must be contiguous uint8 [rows, {expected}], "
                f"got {self.data.dtype} {tuple(self.data.shape)}"
                + ("" if self.data.is_contiguous() else " (not contiguous)")
            )

    @property
    def out_features(self) -> int:
        return int(self.data.shape[0])

    @property
    def type_name(self) -> str:
        return GGML_TYPE_NAMES[self.ggml_type]
