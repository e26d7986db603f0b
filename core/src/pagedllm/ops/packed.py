"""Weights kept as a GGUF checkpoint's quantized blocks, and their exact torch-native dequantization.

A GGUF checkpoint stores most matrices as blocks: 32 weights for Q4_0 / Q4_1 / Q8_0, 256 for the
K-quants Q4_K / Q5_K / Q6_K. When the platform's ``packed_linear`` op says it multiplies a format
directly at every row count (``supports``), the loader keeps only the blocks: the layer's
``weight`` is then a meta tensor (shape and dtype, no storage) and ``packed`` holds the data,
4.5-8.5 bits per weight instead of 32. Elsewhere the loader fills dense weights from ``dequantize``,
which gives gguf-py's (``gguf.quants.dequantize``) fp32 values bit for bit. A fused layer whose
checkpoint tensors differ in format (llama.cpp's Q4_K_M stores q/k as Q4_K and v as Q6_K in many
layers) is one PackedWeight of several ``parts``, each a run of rows in one format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
GGML_MIXED = -1  # PackedWeight.ggml_type of a matrix made of parts in different formats


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A [out_features, in_features] matrix as GGUF blocks, one row per output feature.

    ``data`` is uint8 ``[out_features, in_features // block_weights * block_bytes]``: row r holds
    output feature r's blocks in input order, byte for byte as in the GGUF file (after the
    loader's row reordering, e.g. llama.cpp's q/k permutation undone).

    A matrix whose rows come in runs of different formats (``of_parts``) has ``ggml_type``
    GGML_MIXED, ``parts`` (one-format PackedWeights of the same in_features, in row order) and
    empty ``data`` ([out_features, 0]): code that only knows one format sees no format it takes.
    """

    ggml_type: int
    data: torch.Tensor
    in_features: int
    parts: tuple[PackedWeight, ...] = ()

    @classmethod
    def of_parts(cls, parts: Sequence[PackedWeight]) -> PackedWeight:
        """The row runs ``parts`` stacked into one matrix (one part: that part itself)."""
        if len(parts) == 1:
            return parts[0]
        rows = sum(p.out_features for p in parts)
        in_features = parts[0].in_features if parts else 0
        return cls(GGML_MIXED, torch.empty(rows, 0, dtype=torch.uint8), in_features, tuple(parts))

    def __post_init__(self) -> None:
        if self.ggml_type == GGML_MIXED or self.parts:
            self._check_parts()
            return
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

    def _check_parts(self) -> None:
        if self.ggml_type != GGML_MIXED or len(self.parts) < 2:
            raise ValueError(
                "a PackedWeight of parts needs ggml_type GGML_MIXED and at least two parts (of_parts)"
            )
        for part in self.parts:
            if part.parts or part.in_features != self.in_features:
                raise ValueError(
                    f"each part must be one format of {self.in_features} columns, got "
                    f"{part.type_name} of {part.in_features} columns"
                )
        rows = sum(p.out_features for p in self.parts)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != (rows, 0):
            raise ValueError(
                f"a PackedWeight of parts holds empty uint8 data [{rows}, 0], got {tuple(self.data.shape)}"
            )

    @property
    def out_features(self) -> int:
        return int(self.data.shape[0])

    @property
    def runs(self) -> tuple[PackedWeight, ...]:
        """The one-format runs of rows, in order: the parts, or the weight itself."""
        return self.parts or (self,)

    @property
    def type_name(self) -> str:
        return "+".join(GGML_TYPE_NAMES[p.ggml_type] for p in self.runs)

    @property
    def nbytes(self) -> int:
        return sum(p.data.numel() for p in self.runs)


def dequantize(packed: PackedWeight) -> torch.Tensor:
    """The blocks as fp32 ``[out_features, in_features]``, equal to gguf-py's dequantization bit for bit."""
    if not packed.parts:
        return dequantize_rows(packed.data, packed.ggml_type, packed.in_features)
    out = torch.empty(
        packed.out_features, packed.in_features, dtype=torch.float32, device=packed.parts[0].data.device
    )
    for part, rows in zip(packed.parts, out.split([p.out_features for p in packed.parts]), strict=True):
        dequantize_rows(part.data, part.ggml_type, part.in_features, out=rows)
    return out


_CHUNK_BYTES = 1 << 16  # block bytes per pass: the fp32 output chunk and temporaries stay in cache


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
        fill(blocks[start : start + step], flat[start : start + step])
    return out


# Each fill writes fp32 [n, block_weights] from uint8 [n, type_size] blocks in place, with the same
# fp32 operations in the same order as gguf-py's numpy expression (so the same roundings).


def _f16(b: torch.Tensor, start: int) -> torch.Tensor:  # [n, 1] fp32 from an f16 field
    return b[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles_into(qs: torch.Tensor, out: torch.Tensor, width: int) -> None:
    """qs uint8 [n, groups * width] -> out [n, groups, 2, width]: each group's low nibbles, then its high ones."""
    n = qs.shape[0]
    groups = qs.reshape(n, -1, width)
    out[:, :, 0].copy_(_and(groups, 0x0F))
    out[:, :, 1].copy_(_shr(groups, 4))


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:  # d * (q - 8)
    _nibbles_into(b[:, 2:], out.view(-1, 1, 2, 16), 16)
    out.sub_(8.0).mul_(_f16(b, 0))


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:  # d * q + m
    _nibbles_into(b[:, 4:], out.view(-1, 1, 2, 16), 16)
    out.mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:  # int8 q * d
    out.copy_(b[:, 2:].contiguous().view(torch.int8)).mul_(_f16(b, 0))


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: twelve bytes -> eight 6-bit scales and eight 6-bit mins, each [n, 8] fp32."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([_and(d, 0x3F), _or(_and(m_d, 0x0F), _and(_shr(d, 2), 0x30))], dim=-1)
    mn = torch.cat([_and(m, 0x3F), _or(_shr(m_d, 4), _and(_shr(m, 2), 0x30))], dim=-1)
    return sc.float(), mn.float()


def _k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K per-32 scale d * sc and min dmin * m, each [n, 8, 1]."""
    sc, mn = _scale_min_k4(b[:, 4:16])
    return (_f16(b, 0) * sc).unsqueeze(-1), (_f16(b, 2) * mn).unsqueeze(-1)


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:  # per 32-weight sub-block: d * sc * q - dmin * m
    d, dm = _k4_scales(b)
    _nibbles_into(b[:, 16:], out.view(-1, 4, 2, 32), 32)
    out.view(-1, 8, 32).mul_(d).sub_(dm)


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:  # Q4_K with a fifth bit per weight in qh
    d, dm = _k4_scales(b)
    bits = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)
    qh = _shl(_and(_shr(b[:, 16:48].reshape(-1, 1, 32), bits), 0x01), 4)  # [n, 8, 32]: bit j is sub-block j's
    ql = torch.empty_like(qh)
    _nibbles_into(b[:, 48:], ql.view(-1, 4, 2, 32), 32)
    out.view(-1, 8, 32).copy_(_or(ql, qh)).mul_(d).sub_(dm)


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:  # d * int8 scale per 16 weights * (6-bit q - 32)
    n = b.shape[0]
    d = (_f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()).unsqueeze(-1)  # [n, 16, 1]
    ql = torch.empty(n, 8, 32, dtype=torch.uint8, device=b.device)
    _nibbles_into(b[:, :128], ql.view(n, 2, 2, 64), 64)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    qh = _and(_shr(b[:, 128:192].reshape(n, 2, 1, 32), shifts), 0x03).view(n, 8, 32)
    q = _or(ql, _shl(qh, 4))
    out.view(n, 16, 16).copy_(q.view(n, 16, 16)).sub_(32.0).mul_(d)


# Bit operations as torch.bitwise_* calls: each has an ``out=`` form, which lets the CPU backend
# replay them in a captured decode step (``&`` and ``>>`` dispatch to operators without one).
def _and(x: torch.Tensor, m: int) -> torch.Tensor:
    return torch.bitwise_and(x, m)


def _or(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.bitwise_or(x, y)


def _shr(x: torch.Tensor, s: int | torch.Tensor) -> torch.Tensor:
    return torch.bitwise_right_shift(x, s)


def _shl(x: torch.Tensor, s: int) -> torch.Tensor:
    return torch.bitwise_left_shift(x, s)


_FILLS: dict[int, Callable[[torch.Tensor, torch.Tensor], None]] = {
    GGML_Q4_0: _q4_0,
    GGML_Q4_1: _q4_1,
    GGML_Q8_0: _q8_0,
    GGML_Q4_K: _q4_k,
    GGML_Q5_K: _q5_k,
    GGML_Q6_K: _q6_k,
}
