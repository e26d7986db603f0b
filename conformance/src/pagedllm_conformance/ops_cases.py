"""Inputs for every named op, so the active implementation can be compared with the native default."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pagedllm.plugin import PackedWeight

from pagedllm_conformance.manifest import dtype_name


@dataclass(frozen=True, slots=True)
class OpCase:
    op: str
    variant: str  # short description of the shapes and flags
    dtype: torch.dtype
    make: Callable[[torch.Generator, torch.dtype], dict[str, Any]]  # -> keyword arguments

    @property
    def id(self) -> str:
        return f"{self.op}-{self.variant}-{dtype_name(self.dtype)}"

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def _norm_args(
    tokens: int, hidden: int, eps: float, fused: bool
) -> Callable[[torch.Generator, torch.dtype], dict]:
    def make(gen: torch.Generator, dtype: torch.dtype) -> dict[str, Any]:
        args = {
            "x": _randn(gen, tokens, hidden, scale=3.0).to(dtype),
            "weight": (1.0 + _randn(gen, hidden, scale=0.1)).to(dtype),
            "eps": eps,
        }
        if fused:
            args["residual"] = _randn(gen, tokens, hidden).to(dtype)
        return args

    return make


def _cos_sin_cache(max_position: int, rotary_dim: int, base: float) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_position, rotary_dim]


def _rotary_args(
    tokens: int, head_size: int, rotary_dim: int, neox: bool
) -> Callable[[torch.Generator, torch.dtype], dict]:
    def make(gen: torch.Generator, dtype: torch.dtype) -> dict[str, Any]:
        max_position = 256
        return {
            "positions": torch.randint(0, max_position, (tokens,), generator=gen, dtype=torch.int64),
            "query": _randn(gen, tokens, 4, head_size).to(dtype),
            "key": _randn(gen, tokens, 2, head_size).to(dtype),
            "cos_sin_cache": _cos_sin_cache(max_position, rotary_dim, 10000.0),
            "is_neox_style": neox,
        }

    return make


def _gated_args(shape: tuple[int, ...]) -> Callable[[torch.Generator, torch.dtype], dict]:
    def make(gen: torch.Generator, dtype: torch.dtype) -> dict[str, Any]:
        return {"x": _randn(gen, *shape, scale=2.0).to(dtype)}

    return make


# GGUF block formats by GGML type id: bytes per block of 32 weights (spelled out here, not taken from the core).
_Q4_0, _Q4_1, _Q8_0 = 2, 3, 8
_BLOCK_BYTES = {_Q4_0: 18, _Q4_1: 20, _Q8_0: 34}


def _decode_blocks(packed: PackedWeight) -> torch.Tensor:  # [out_features, in_features] fp64
    """GGUF's definitions: Q4_0 d * (q - 8), Q4_1 d * q + m, Q8_0 d * q; f16 d and m lead each block,
    and a Q4 byte's low nibble is element j, its high nibble element j + 16."""
    rows, in_features, t = packed.data.shape[0], packed.in_features, packed.ggml_type
    b = packed.data.cpu().reshape(rows, in_features // 32, _BLOCK_BYTES[t])  # [rows, blocks, bytes]
    d = b[..., 0:2].contiguous().view(torch.float16).double()  # [rows, blocks, 1]
    if t == _Q8_0:
        return (d * b[..., 2:].contiguous().view(torch.int8).double()).reshape(rows, in_features)
    qs = b[..., 4:] if t == _Q4_1 else b[..., 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).double()  # [rows, blocks, 32]
    w = d * q + b[..., 2:4].contiguous().view(torch.float16).double() if t == _Q4_1 else d * (q - 8)
    return w.reshape(rows, in_features)


def _packed_linear_args(
    ggml_type: int, tokens: int, out_features: int, in_features: int, bias: bool
) -> Callable[[torch.Generator, torch.dtype], dict]:
    def make(gen: torch.Generator, dtype: torch.dtype) -> dict[str, Any]:
        shape = (out_features, in_features // 32, 1)  # one scale (and min) per block
        q8 = ggml_type == _Q8_0  # 8-bit quants: 16x smaller scales for weights of the same size (below 0.5)
        if dtype == torch.float32:
            d = _randn(gen, *shape, scale=0.002 if q8 else 0.02).half()
            m = _randn(gen, *shape, scale=0.1).half()
        else:
            # Power-of-two scales and mins that are multiples of them: every weight (an integer below
            # 2^8 times a power of two) is exact in bf16 and fp16, so ``weight`` is the blocks' value.
            sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
            low = 9 if q8 else 5
            d = (sign * 2.0 ** -torch.randint(low, low + 4, shape, generator=gen).double()).half()
            m = (d.double() * -torch.randint(0, 17, shape, generator=gen)).half()
        header = torch.cat([d, m], dim=-1) if ggml_type == _Q4_1 else d
        quants = torch.randint(0, 256, (*shape[:2], 32 if ggml_type == _Q8_0 else 16), generator=gen)
        data = torch.cat([header.view(torch.uint8), quants.to(torch.uint8)], dim=-1).reshape(out_features, -1)
        packed = PackedWeight(ggml_type, data.contiguous(), in_features)
        # ``weight`` is the blocks' exact value, as the loader keeps it beside them.
        return {
            "x": _randn(gen, tokens, in_features).to(dtype),
            "weight": _decode_blocks(packed).float().to(dtype),
            "bias": _randn(gen, out_features).to(dtype) if bias else None,
            "packed": packed,
        }

    return make


def _edge_rows(gen: torch.Generator, hidden: int, eps: float, large: float) -> torch.Tensor:  # [6, hidden] fp32
    """Rows whose magnitude is what the ordinary cases never reach: mean square 0.1x, 1x and 10x eps
    (where eps outside the square root, or a missing eps, changes the result by tens of percent), all
    zeros, values near ``large``, and one ordinary row."""
    unit = _randn(gen, 6, hidden)
    unit = unit / unit.pow(2).mean(-1, keepdim=True).sqrt()  # mean square exactly 1 per row
    scale = torch.tensor([(0.1 * eps) ** 0.5, eps**0.5, (10 * eps) ** 0.5, 0.0, large, 1.0]).unsqueeze(-1)
    return unit * scale


def _norm_edge_args(hidden: int, eps: float, fused: bool) -> Callable[[torch.Generator, torch.dtype], dict]:
    def make(gen: torch.Generator, dtype: torch.dtype) -> dict[str, Any]:
        # 1e3: rows whose squares (1e6) overflow fp16, for an implementation that squares in the input dtype.
        rows = _edge_rows(gen, hidden, eps, 1e3)
        args = {"x": rows.to(dtype), "weight": (1.0 + _randn(gen, hidden, scale=0.1)).to(dtype), "eps": eps}
        if fused:
            # x + residual lands on the edge rows: half of each row on either side, plus a cancelling pair.
            args["x"] = (rows * 0.5 + 0.25).to(dtype)
            args["residual"] = (rows * 0.5 - 0.25).to(dtype)
        return args

    return make


def _gated_edge_args(width: int) -> Callable[[torch.Generator, torch.dtype], dict]:
    def make(gen: torch.Generator, dtype: torch.dtype) -> dict[str, Any]:
        # Gates where exp() overflows or underflows (|x| up to ~90), zeros, and tiny values.
        rows = torch.cat([_randn(gen, 1, 2 * width, scale=30.0).clamp(-90, 90),
                          torch.zeros(1, 2 * width), _randn(gen, 1, 2 * width, scale=1e-4),
                          _randn(gen, 1, 2 * width, scale=2.0)])
        return {"x": rows.to(dtype)}

    return make


def _rotary_edge_args(head_size: int, neox: bool) -> Callable[[torch.Generator, torch.dtype], dict]:
    def make(gen: torch.Generator, dtype: torch.dtype) -> dict[str, Any]:
        max_position = 4096
        positions = torch.tensor([0, 1, max_position - 1, max_position - 2, 2048], dtype=torch.int64)
        # ordinary, zeros, large, tiny (larger rows only measure fp32 cancellation against the fp64 definition)
        scale = torch.tensor([1.0, 0.0, 10.0, 1e-4, 1.0]).view(5, 1, 1)
        return {
            "positions": positions,
            "query": (_randn(gen, 5, 4, head_size) * scale).to(dtype),
            "key": (_randn(gen, 5, 2, head_size) * scale).to(dtype),
            "cos_sin_cache": _cos_sin_cache(max_position, head_size, 10000.0),
            "is_neox_style": neox,
        }

    return make


def _bitmask_args(rows: int, vocab: int, constrained: tuple[int, ...]) -> Callable[[torch.Generator, torch.dtype], dict]:
    def make(gen: torch.Generator, dtype: torch.dtype) -> dict[str, Any]:
        words = (vocab + 31) // 32
        bitmask = torch.randint(-(2**31), 2**31 - 1, (len(constrained), words), generator=gen, dtype=torch.int64)
        bitmask = bitmask.to(torch.int32)
        bitmask[0, 0] = -1  # a word with every token allowed
        return {
            "logits": _randn(gen, rows, vocab, scale=4.0).to(dtype),
            "bitmask": bitmask,
            "indices": torch.tensor(constrained, dtype=torch.int64),
        }

    return make


def _bitmask_edge_args() -> Callable[[torch.Generator, torch.dtype], dict]:
    def make(gen: torch.Generator, dtype: torch.dtype) -> dict[str, Any]:
        vocab = 70  # three words, the last one partly past the vocabulary
        words = (vocab + 31) // 32
        bitmask = torch.zeros(3, words, dtype=torch.int32)
        bitmask[0] = -1  # every token allowed
        bitmask[1, 2] = 1 << 5  # only the last token (69)
        bitmask[2, 0] = -(2**31)  # only token 31: the sign bit, read as unsigned
        # Large-magnitude logits (and a row left unconstrained between them).
        logits = _randn(gen, 4, vocab, scale=1e3)
        return {"logits": logits.to(dtype), "bitmask": bitmask, "indices": torch.tensor([0, 1, 3], dtype=torch.int64)}

    return make


def _packed_embedding_args(ggml_type: int, ids: list[int], rows: int, in_features: int) -> Callable[[torch.Generator, torch.dtype], dict]:
    blocks = _packed_linear_args(ggml_type, 1, rows, in_features, False)

    def make(gen: torch.Generator, dtype: torch.dtype) -> dict[str, Any]:
        # The op returns fp32 rows whatever the model dtype: the blocks are the same.
        return {"ids": torch.tensor(ids, dtype=torch.int64), "packed": blocks(gen, torch.float32)["packed"]}

    return make


def _packed_linear_edge_args(ggml_type: int) -> Callable[[torch.Generator, torch.dtype], dict]:
    ordinary = _packed_linear_args(ggml_type, 4, 24, 128, True)

    def make(gen: torch.Generator, dtype: torch.dtype) -> dict[str, Any]:
        args = ordinary(gen, dtype)
        scale = torch.tensor([0.0, 1e-4, 1e2, 1.0]).unsqueeze(-1)  # zeros, tiny, large, ordinary rows
        args["x"] = (args["x"].float() * scale).to(dtype)
        return args

    return make


def _edge_variants() -> dict[str, list[tuple[str, Callable[[torch.Generator, torch.dtype], dict]]]]:
    """Edge magnitudes for every op; cheap, so they run in --quick too."""
    return {
        "rms_norm": [("edge-h128-eps1e-6", _norm_edge_args(128, 1e-6, False)),
                     ("edge-h96-eps1e-5", _norm_edge_args(96, 1e-5, False))],
        "fused_add_rms_norm": [("edge-h128-eps1e-6", _norm_edge_args(128, 1e-6, True)),
                               ("edge-h96-eps1e-5", _norm_edge_args(96, 1e-5, True))],
        "rotary_embedding": [("edge-hs64-neox", _rotary_edge_args(64, True)),
                             ("edge-hs64-gptj", _rotary_edge_args(64, False))],
        "silu_and_mul": [("edge-4x256", _gated_edge_args(128))],
        "gelu_tanh_and_mul": [("edge-4x256", _gated_edge_args(128))],
        "apply_token_bitmask": [("edge-v70-sign-bit-last-token-large", _bitmask_edge_args())],
        "packed_linear": [("edge-q4_0-t4-n24-k128", _packed_linear_edge_args(_Q4_0)),
                          ("edge-q8_0-t4-n24-k128", _packed_linear_edge_args(_Q8_0))],
        # A gated MLP's [gate; up] rows (n = 2 d) under the same zero / tiny / large input rows.
        "packed_linear_silu_and_mul": [("edge-q4_0-t4-n2x12-k128", _packed_linear_edge_args(_Q4_0)),
                                       ("edge-q8_0-t4-n2x12-k128", _packed_linear_edge_args(_Q8_0))],
        # The first and last rows, a repeated row, and no row at all.
        "packed_embedding": [("edge-q4_0-first-last-repeat", _packed_embedding_args(_Q4_0, [0, 39, 39, 0], 40, 64)),
                             ("edge-q8_0-no-ids", _packed_embedding_args(_Q8_0, [], 8, 32))],
    }


def _op_variants() -> dict[str, list[tuple[str, Callable[[torch.Generator, torch.dtype], dict]]]]:
    return {
        "rms_norm": [
            ("t1-h64-eps1e-6", _norm_args(1, 64, 1e-6, False)),
            ("t7-h256-eps1e-5", _norm_args(7, 256, 1e-5, False)),
            ("t33-h1000-eps1e-6", _norm_args(33, 1000, 1e-6, False)),
        ],
        "fused_add_rms_norm": [
            ("t1-h64-eps1e-6", _norm_args(1, 64, 1e-6, True)),
            ("t7-h256-eps1e-5", _norm_args(7, 256, 1e-5, True)),
            ("t33-h1000-eps1e-6", _norm_args(33, 1000, 1e-6, True)),
        ],
        "rotary_embedding": [
            ("t1-hs64-full-neox", _rotary_args(1, 64, 64, True)),
            ("t9-hs64-full-gptj", _rotary_args(9, 64, 64, False)),
            ("t40-hs128-partial32-neox", _rotary_args(40, 128, 32, True)),
            ("t17-hs80-partial40-gptj", _rotary_args(17, 80, 40, False)),
        ],
        "silu_and_mul": [
            ("1x128", _gated_args((1, 128))),
            ("9x704", _gated_args((9, 704))),
            ("2x3x96", _gated_args((2, 3, 96))),
        ],
        "gelu_tanh_and_mul": [
            ("1x128", _gated_args((1, 128))),
            ("9x704", _gated_args((9, 704))),
            ("2x3x96", _gated_args((2, 3, 96))),
        ],
        "packed_linear": [
            ("q4_1-t1-n37-k96", _packed_linear_args(_Q4_1, 1, 37, 96, False)),
            ("q8_0-t5-n64-k256-bias", _packed_linear_args(_Q8_0, 5, 64, 256, True)),
            ("q4_0-t16-n40-k576-bias", _packed_linear_args(_Q4_0, 16, 40, 576, True)),
            ("q4_1-t8-n5-k32-bias", _packed_linear_args(_Q4_1, 8, 5, 32, True)),
            ("q4_0-t3-n1-k64", _packed_linear_args(_Q4_0, 3, 1, 64, False)),
        ],
        "packed_linear_silu_and_mul": [
            ("q4_1-t1-n2x48-k96", _packed_linear_args(_Q4_1, 1, 96, 96, False)),
            ("q8_0-t5-n2x32-k256-bias", _packed_linear_args(_Q8_0, 5, 64, 256, True)),
            ("q4_0-t40-n2x64-k576", _packed_linear_args(_Q4_0, 40, 128, 576, False)),
        ],
        "packed_embedding": [
            ("q8_0-t5-v64-k256", _packed_embedding_args(_Q8_0, [3, 17, 63, 0, 17], 64, 256)),
            ("q4_1-t1-v37-k96", _packed_embedding_args(_Q4_1, [36], 37, 96)),
            ("q4_0-t16-v40-k576", _packed_embedding_args(_Q4_0, list(range(39, 7, -2)), 40, 576)),
        ],
        "apply_token_bitmask": [
            ("r4-v1000-rows2,0", _bitmask_args(4, 1000, (2, 0))),
            ("r16-v49152-rows8", _bitmask_args(16, 49152, (1, 3, 5, 7, 9, 11, 13, 15))),
            ("r1-v33-row0", _bitmask_args(1, 33, (0,))),
        ],
    }


def argmax_edge_rows(gen: torch.Generator) -> torch.Tensor:
    """[9, 100] fp32 logits whose argmax (torch.max(x, -1).indices) tests a row-argmax kernel: two NaNs
    (the first wins), all -inf, a tie of large values, -0.0 tied with +0.0, a NaN in the last element,
    an inf before a NaN, a NaN first, an inf before a later NaN, a tie 16 elements apart (across vector
    lanes)."""
    nan, inf = float("nan"), float("inf")
    rows = torch.randn(9, 100, generator=gen)
    rows[0, 50] = rows[0, 70] = nan
    rows[1] = -inf
    rows[2, 10] = rows[2, 90] = 1e30
    rows[3] = 0.0
    rows[3, 0] = -0.0
    rows[4, 99] = nan
    rows[5, 3], rows[5, 60] = inf, nan
    rows[6, 0] = nan
    rows[7, 17], rows[7, 5] = nan, inf
    rows[8, 31] = rows[8, 47] = 50.0
    return rows


def op_grid(op_names: list[str], dtypes: list[torch.dtype], quick: bool) -> list[OpCase]:
    """Every variant of every op for each dtype (quick: the first two variants; the edge-magnitude ones
    always). An op the suite has no inputs for gets a case that fails, so new ops cannot slip through untested."""
    variants = _op_variants()
    cases = []
    for name in op_names:
        chosen = variants.get(name, [("no-inputs", None)])
        if quick:
            chosen = chosen[:2]
        chosen = chosen + _edge_variants().get(name, [])
        for dtype in dtypes:
            cases += [OpCase(name, label, dtype, make) for label, make in chosen]  # type: ignore[arg-type]
    return cases


def as_outputs(result: Any) -> list[torch.Tensor]:
    """An op returns a tensor or a tuple of tensors; compare them position by position."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in result):
        return list(result)
    raise AssertionError(f"op returned {type(result).__name__}, not a tensor or a tuple of tensors")


def _rotate(
    x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, neox: bool
) -> torch.Tensor:
    """Rotate each (first, second) feature pair by its position's angle, pair by pair, in fp64."""
    rotary_dim = cos_sin_cache.shape[-1]
    half = rotary_dim // 2
    cos, sin = cos_sin_cache[positions, :half].double(), cos_sin_cache[positions, half:].double()  # [T, half]
    out = x.double().clone()
    for j in range(half):
        a, b = (j, j + half) if neox else (2 * j, 2 * j + 1)
        xa, xb = x[..., a].double(), x[..., b].double()  # [T, heads]
        c, s = cos[:, j : j + 1], sin[:, j : j + 1]
        out[..., a], out[..., b] = xa * c - xb * s, xb * c + xa * s
    return out


def textbook(name: str, args: dict[str, Any]) -> list[torch.Tensor] | None:
    """Each op from its definition in fp64, independent of the core's native code: checks the oracle itself."""
    d = {
        k: (v.double() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v)
        for k, v in args.items()
    }
    if name in ("rms_norm", "fused_add_rms_norm"):
        x = d["x"] + d["residual"] if name == "fused_add_rms_norm" else d["x"]
        normed = x / torch.sqrt((x * x).mean(-1, keepdim=True) + d["eps"]) * d["weight"]
        return [normed, x] if name == "fused_add_rms_norm" else [normed]
    if name in ("silu_and_mul", "gelu_tanh_and_mul"):
        gate, up = d["x"].chunk(2, dim=-1)
        if name == "silu_and_mul":
            act = gate / (1 + torch.exp(-gate))
        else:
            act = 0.5 * gate * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (gate + 0.044715 * gate**3)))
        return [act * up]
    if name == "rotary_embedding":
        pos, cache, neox = args["positions"], args["cos_sin_cache"], args["is_neox_style"]
        return [_rotate(args["query"], pos, cache, neox), _rotate(args["key"], pos, cache, neox)]
    if name == "apply_token_bitmask":
        # Token t of constrained row i is kept iff bit t % 32 of word t // 32 (read as unsigned) is set.
        out = d["logits"].clone()
        words = args["bitmask"].long() & 0xFFFFFFFF  # [M, W]
        cols = torch.arange(min(out.shape[1], words.shape[1] * 32))
        keep = ((words[:, cols // 32] >> (cols % 32)) & 1).bool()  # [M, n]
        for i, row in enumerate(args["indices"].tolist()):
            out[row, : cols.numel()] = torch.where(keep[i], out[row, : cols.numel()], -torch.inf)
        return [out]
    if name == "packed_linear":
        # From the blocks, not from ``weight``: a weight that disagrees with them fails the oracle.
        y = d["x"] @ _decode_blocks(args["packed"]).T
        return [y + d["bias"] if d["bias"] is not None else y]
    if name == "packed_linear_silu_and_mul":
        y = d["x"] @ _decode_blocks(args["packed"]).T
        gate, up = (y + d["bias"] if d["bias"] is not None else y).chunk(2, dim=-1)
        return [gate / (1 + torch.exp(-gate)) * up]
    if name == "packed_embedding":
        return [_decode_blocks(args["packed"])[args["ids"]]]
    return None
