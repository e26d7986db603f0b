"""A fast GGUF file reader: metadata and tensor table parsed from an mmap, tensors dequantized on demand.

``gguf.GGUFReader`` builds a numpy memmap per metadata string, which takes seconds for a 49k-token
vocabulary; this reader parses the same format with ``struct`` in well under a second and leaves
dequantization to ``gguf.quants``.
"""

from __future__ import annotations

import mmap
import struct
import warnings
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
import torch

from pagedllm.errors import ModelLoadError

_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_F32, _F16, _BF16 = 0, 1, 30


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF stores the fastest-moving dimension first)
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """An open GGUF file: ``metadata`` (dict), ``tensors`` (name -> info), ``load_tensor(name)`` -> fp32 tensor."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot open GGUF file {path}: {e}") from None
        try:
            self.metadata, self.tensors = self._parse()
        except (struct.error, UnicodeDecodeError, IndexError) as e:
            raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from None

    # -- header ---------------------------------------------------------------------------
    def _parse(self) -> tuple[dict[str, Any], dict[str, GGUFTensorInfo]]:
        mm = self._mm
        if mm[:4] != b"GGUF":
            raise ModelLoadError(f"{self.path} is not a GGUF file (bad magic bytes)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        if version not in (2, 3):
            raise ModelLoadError(
                f"{self.path} is GGUF version {version}; only versions 2 and 3 are supported"
            )
        pos = 24
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = self._string(pos)
            (vtype,) = struct.unpack_from("<I", mm, pos)
            metadata[key], pos = self._value(pos + 4, vtype)
        entries = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            (ndim,) = struct.unpack_from("<I", mm, pos)
            dims = struct.unpack_from(f"<{ndim}Q", mm, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", mm, pos + 4 + 8 * ndim)
            pos += 4 + 8 * ndim + 12
            entries.append((name, tuple(int(d) for d in reversed(dims)), int(ggml_type), int(offset)))
        alignment = int(metadata.get("general.alignment", 32))
        data_start = -(-pos // alignment) * alignment
        tensors = {
            name: GGUFTensorInfo(name, shape, t, data_start + off, _nbytes(t, prod(shape), name))
            for name, shape, t, off in entries
        }
        return metadata, tensors

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._mm, pos)
        pos += 8
        return self._mm[pos : pos + n].decode("utf-8", errors="replace"), pos + n

    def _value(self, pos: int, vtype: int) -> tuple[Any, int]:
        if vtype in _SCALAR_FORMATS:
            fmt = "<" + _SCALAR_FORMATS[vtype]
            return struct.unpack_from(fmt, self._mm, pos)[0], pos + struct.calcsize(fmt)
        if vtype == _STRING:
            return self._string(pos)
        if vtype == _ARRAY:
            etype, n = struct.unpack_from("<IQ", self._mm, pos)
            pos += 12
            if etype in _SCALAR_FORMATS:
                fmt = f"<{n}{_SCALAR_FORMATS[etype]}"
                return list(struct.unpack_from(fmt, self._mm, pos)), pos + struct.calcsize(fmt)
            values = []
            for _ in range(n):
                v, pos = self._value(pos, etype)
                values.append(v)
            return values, pos
        raise ModelLoadError(f"{self.path}: unknown GGUF metadata value type {vtype}")

    # -- tensors --------------------------------------------------------------------------
    def load_blocks(self, name: str) -> tuple[int, torch.Tensor]:
        """(GGML type, the raw bytes as uint8 ``[rows, bytes per row]``), copied out of the mmap."""
        info = self.tensors[name]
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        return info.ggml_type, torch.from_numpy(raw.copy()).view(rows, -1)

    def load_tensor(self, name: str) -> torch.Tensor:
        """The tensor dequantized to fp32 (or its stored float type for F16/BF16), in torch shape order."""
        info = self.tensors[name]
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        if info.ggml_type == _F32:
            return torch.from_numpy(raw.view(np.float32).copy()).view(info.shape)
        if info.ggml_type == _F16:
            return torch.from_numpy(raw.view(np.float16).copy()).view(info.shape)
        if info.ggml_type == _BF16:
            return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).view(info.shape)
        return dequantize(raw, info.ggml_type, info.shape, name)


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], name: str = "") -> torch.Tensor:
    """Dequantize GGML blocks to an fp32 tensor of ``shape``: torch fast paths for common types, else gguf.quants."""
    fast = _FAST_DEQUANT.get(ggml_type)
    if fast is not None:
        return fast(raw).view(shape)
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType(ggml_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        rows = raw.reshape(-1, shape[-1] // block * type_size)
        out = gguf.quants.dequantize(rows, qtype)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ModelLoadError(f"tensor {name}: cannot dequantize GGML type {ggml_type}: {e}") from None
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).view(shape)


_CHUNK_BLOCKS = 4096  # blocks per pass: the fp32 working set stays in cache (~0.5 MB)


def _chunked(raw: np.ndarray, type_size: int, fill: Any) -> torch.Tensor:
    """Dequantize 32-element blocks chunk by chunk into one fp32 buffer; ``fill(blocks, out)`` does a chunk."""
    with warnings.catch_warnings():
        # The mmap is read-only; the blocks are only ever read.
        warnings.simplefilter("ignore", UserWarning)
        blocks = torch.from_numpy(raw).view(-1, type_size)  # [n_blocks, type_size] uint8
    out = torch.empty(blocks.shape[0], 32, dtype=torch.float32)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        fill(blocks[start : start + _CHUNK_BLOCKS], out[start : start + _CHUNK_BLOCKS])
    return out.view(-1)


def _f16(b: torch.Tensor, start: int, count: int) -> torch.Tensor:  # [n, count] fp32 from f16 fields
    return b[:, start : start + 2 * count].contiguous().view(torch.float16).float()


def _unpack_nibbles(qs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """[n, 16] uint8 -> out [n, 32] fp32: the low nibbles are elements 0-15, the high ones 16-31."""
    out[:, :16].copy_(qs & 0x0F)
    out[:, 16:].copy_(qs >> 4)
    return out


def _fill_q8_0(b: torch.Tensor, out: torch.Tensor) -> None:  # f16 scale, 32 x int8
    out.copy_(b[:, 2:].contiguous().view(torch.int8)).mul_(_f16(b, 0, 1))


def _fill_q4_0(b: torch.Tensor, out: torch.Tensor) -> None:  # f16 scale, 16 bytes of nibbles: d * (q - 8)
    _unpack_nibbles(b[:, 2:], out).sub_(8.0).mul_(_f16(b, 0, 1))


def _fill_q4_1(b: torch.Tensor, out: torch.Tensor) -> None:  # f16 scale, f16 min, nibbles: d * q + m
    dm = _f16(b, 0, 2)
    _unpack_nibbles(b[:, 4:], out).mul_(dm[:, :1]).add_(dm[:, 1:2])


def _dequant_q8_0(raw: np.ndarray) -> torch.Tensor:
    return _chunked(raw, 34, _fill_q8_0)


def _dequant_q4_0(raw: np.ndarray) -> torch.Tensor:
    return _chunked(raw, 18, _fill_q4_0)


def _dequant_q4_1(raw: np.ndarray) -> torch.Tensor:
    return _chunked(raw, 20, _fill_q4_1)


_FAST_DEQUANT = {2: _dequant_q4_0, 3: _dequant_q4_1, 8: _dequant_q8_0}


def _nbytes(ggml_type: int, elements: int, name: str) -> int:
    if ggml_type == _F32:
        return 4 * elements
    if ggml_type in (_F16, _BF16):
        return 2 * elements
    import gguf

    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ModelLoadError(f"tensor {name} has unknown GGML type {ggml_type}") from None
    return elements // block * type_size
