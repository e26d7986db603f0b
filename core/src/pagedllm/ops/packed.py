"""Weights kept as a GGUF checkpoint's quantized blocks, and their exact torch-native dequantization.

A GGUF checkpoint stores most matrices as blocks: 32 weights for Q4_0 / Q4_1 / Q8_0, 256 for the
K-quants Q4_K / Q5_K / Q6_K. When the platform's ``packed_linear`` op says it multiplies a format
directly at every row count (``supports``), the loader keeps only the blocks: the layer's
``weight`` is then a meta tensor (shape and dtype, no storage) and ``packed`` holds the data,
5-8.5 bits per weight instead of 32. Elsewhere the loader fills dense weights from ``dequantize``,
which gives gguf-py's (``gguf.quants.dequantize``) fp32 values bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# GGML type ids of the block formats, with weights and bytes per block (as gguf-py / llama.cpp define them).
GGML_Q4_0, GGML_Q4_1, GGML_Q8_0 = 2, 3, 8
GGML_Q4_K, GGML_Q5_K, GGML_Q6_K = 12, 13, 14
GGML_BLOCK_WEIGHTS = {
    GGML_Q4_0: 32,
    GGML_Q4_1: 32,
    GGML_Q8_0: 32,
    GGML_Q4_K: 256,
    GGML_Q5_K: 256,
    GGML_Q6_K: 256,
}
GGML_BLOCK_BYTES = {
    GGML_Q4_0: 18,
    GGML_Q4_1: 20,
    GGML_Q8_0: 34,
    GGML_Q4_K: 144,
    GGML_Q5_K: 176,
    GGML_Q6_K: 210,
}
GGML_TYPE_NAMES = {
    GGML_Q4_0: "Q4_0",
    GGML_Q4_1: "Q4_1",
    GGML_Q8_0: "Q8_0",
    GGML_Q4_K: "Q4_K",
    GGML_Q5_K: "Q5_K",
    GGML_Q6_K: "Q6_K",
}
GGML_BLOCK = 32  # weights per block of the legacy formats (Q4_0, Q4_1, Q8_0)


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A [out_features, in_features] matrix as GGUF blocks, one row per output feature.

    ``data`` is uint8 ``[out_features, in_features // block_weights * block_bytes]``: row r holds
    output feature r's blocks in input order, byte for byte as in the GGUF file (after the
    loader's row reordering, e.g. llama.cpp's q/k permutation undone).
    """

    ggml_type: int
    data: torch.Tensor
    in_features: int

    def __post_init__(self) -> None:
        block_bytes = GGML_BLOCK_BYTES.get(self.ggml_type)
        if block_bytes is None:
            raise ValueError(f"GGML type {self.ggml_type} is not a packable block format")
        block = GGML_BLOCK_WEIGHTS[self.ggml_type]
        if self.in_features % block:
            raise ValueError(
                f"in_features {self.in_features} is not a whole number of {block}-weight blocks "
                f"({GGML_TYPE_NAMES[self.ggml_type]})"
            )
        expected = self.in_features // block * block_bytes
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

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def dequantize(packed: PackedWeight) -> torch.Tensor:
    """The blocks as fp32 ``[out_features, in_features]``, equal to gguf-py's dequantization bit for bit."""
    return dequantize_rows(packed.data, packed.ggml_type, packed.in_features)


_CHUNK_BYTES = 1 << 20  # block bytes per pass: the fp32 temporaries stay a few MB


def dequantize_rows(
    data: torch.Tensor, ggml_type: int, in_features: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 ``[rows, bytes per row]`` blocks -> fp32 ``[rows, in_features]`` (into ``out`` if given), chunk by chunk."""
    fill = _FILLS.get(ggml_type)
    if fill is None:
        raise ValueError(f"GGML type {ggml_type} is not a packable block format")
    type_size, block = GGML_BLOCK_BYTES[ggml_type], GGML_BLOCK_WEIGHTS[ggml_type]
    blocks = data.reshape(-1, type_size)  # [n_blocks, type_size]
    if blocks.shape[0] * block != data.shape[0] * in_features:
        raise ValueError(
            f"{tuple(data.shape)} bytes of {GGML_TYPE_NAMES[ggml_type]} blocks are not {in_features} columns"
        )
    if out is None:
        out = torch.empty(data.shape[0], in_features, dtype=torch.float32, device=data.device)
    flat = out.view(-1, block)
    step = max(1, _CHUNK_BYTES // type_size)
    for start in range(0, blocks.shape[0], step):
        chunk = blocks[start : start + step]
        flat[start : start + step] = fill(chunk, chunk.shape[0])
    return out


# Each fill mirrors gguf-py's numpy expression operation for operation (same fp32 roundings), on
# uint8 [n, type_size] blocks, giving fp32 [n, block_weights].


def _f16(b: torch.Tensor, start: int) -> torch.Tensor:  # [n, 1] fp32 from an f16 field
    return b[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """[n, groups * width] uint8 -> [n, groups, 2, width]: each group's low nibbles, then its high ones."""
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=qs.device).view(1, 1, 2, 1)
    return (qs.reshape(n, -1, 1, width) >> shifts) & 0x0F


def _q4_0(b: torch.Tensor, n: int) -> torch.Tensor:  # d * (q - 8)
    q = _nibbles(b[:, 2:], n, 16).reshape(n, 32).to(torch.int8) - 8
    return _f16(b, 0) * q.float()


def _q4_1(b: torch.Tensor, n: int) -> torch.Tensor:  # d * q + m
    q = _nibbles(b[:, 4:], n, 16).reshape(n, 32).float()
    return _f16(b, 0) * q + _f16(b, 2)


def _q8_0(b: torch.Tensor, n: int) -> torch.Tensor:  # int8 q * d
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _scale_min_k4(scales: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: twelve bytes -> eight 6-bit scales and eight 6-bit mins, each [n, 8] fp32."""
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _q4_k(b: torch.Tensor, n: int) -> torch.Tensor:  # per 32-sub-block: d * sc * q - dmin * m
    sc, mn = _scale_min_k4(b[:, 4:16], n)
    d = (_f16(b, 0) * sc).view(n, 8, 1)
    dm = (_f16(b, 2) * mn).view(n, 8, 1)
    q = _nibbles(b[:, 16:], n, 32).reshape(n, 8, 32).float()
    return (d * q - dm).view(n, 256)


def _q5_k(b: torch.Tensor, n: int) -> torch.Tensor:  # Q4_K with a fifth bit per weight in qh
    sc, mn = _scale_min_k4(b[:, 4:16], n)
    d = (_f16(b, 0) * sc).view(n, 8, 1)
    dm = (_f16(b, 2) * mn).view(n, 8, 1)
    bits = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)
    qh = (b[:, 16:48].reshape(n, 1, 32) >> bits) & 0x01  # [n, 8, 32]: bit j is sub-block j's
    ql = _nibbles(b[:, 48:], n, 32).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return (d * q - dm).view(n, 256)


def _q6_k(b: torch.Tensor, n: int) -> torch.Tensor:  # d * int8 scale per 16 weights * (6-bit q - 32)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b, 208) * scales).view(n, 16, 1)
    ql = _nibbles(b[:, :128], n, 64).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    qh = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 0x03).reshape(n, 8, 32)
    q = (ql | (qh << 4)).to(torch.int8) - 32
    return (d * q.view(n, 16, 16).float()).view(n, 256)


_FILLS = {
    GGML_Q4_0: _q4_0,
    GGML_Q4_1: _q4_1,
    GGML_Q8_0: _q8_0,
    GGML_Q4_K: _q4_k,
    GGML_Q5_K: _q5_k,
    GGML_Q6_K: _q6_k,
}
