"""A fast GGUF file reader: metadata and tensor table parsed from an mmap, tensors dequantized on demand.

``gguf.GGUFReader`` builds a numpy memmap per metadata string, which takes seconds for a 49k-token
vocabulary; this reader parses the same format with ``struct`` in well under a second. Block formats are
dequantized by ``pagedllm.ops.packed`` (torch), others by ``gguf.quants``.
"""

from __future__ import annotations

import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
import torch

from pagedllm.errors import ModelLoadError
from pagedllm.ops.packed import GGML_BLOCK_BYTES, GGML_BLOCK_WEIGHTS, dequantize_rows

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
    def row_bytes(self, name: str) -> int:
        info = self.tensors[name]
        return info.nbytes // self.rows(name)

    def rows(self, name: str) -> int:
        shape = self.tensors[name].shape
        return prod(shape[:-1]) if len(shape) > 1 else 1

    def load_blocks(self, name: str, out: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
        """(GGML type, the raw bytes as uint8 ``[rows, bytes per row]``), read into ``out`` if given.

        Read with ``pread``, not through the mmap: the copy is all the process keeps, with no
        mapped file pages beside it (the process's peak memory stays one copy of the blocks).
        """
        info = self.tensors[name]
        shape = (self.rows(name), info.nbytes // self.rows(name))
        if out is None:
            out = torch.empty(shape, dtype=torch.uint8)
        elif tuple(out.shape) != shape or out.dtype != torch.uint8 or not out.is_contiguous():
            raise ValueError(f"tensor {name}: cannot read {shape} uint8 blocks into {out.dtype} {tuple(out.shape)}")
        view = memoryview(out.numpy()).cast("B")  # type: ignore[arg-type]
        done = 0
        with open(self.path, "rb", buffering=0) as f:
            while done < info.nbytes:
                n = os.preadv(f.fileno(), [view[done:]], info.offset + done)
                if n <= 0:
                    raise ModelLoadError(f"{self.path}: tensor {name} ends past the end of the file")
                done += n
        return info.ggml_type, out

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
    """Dequantize GGML blocks to an fp32 tensor of ``shape``: torch for the block formats pagedllm keeps
    (pagedllm.ops.packed, equal to gguf-py bit for bit), gguf.quants for the others."""
    if ggml_type in GGML_BLOCK_BYTES:
        with warnings.catch_warnings():
            # The mmap is read-only; the blocks are only ever read.
            warnings.simplefilter("ignore", UserWarning)
            blocks = torch.from_numpy(raw)
        in_features = shape[-1]
        row_bytes = in_features // GGML_BLOCK_WEIGHTS[ggml_type] * GGML_BLOCK_BYTES[ggml_type]
        return dequantize_rows(blocks.view(-1, row_bytes), ggml_type, in_features).view(shape)
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType(ggml_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        rows = raw.reshape(-1, shape[-1] // block * type_size)
        out = gguf.quants.dequantize(rows, qtype)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ModelLoadError(f"tensor {name}: cannot dequantize GGML type {ggml_type}: {e}") from None
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).view(shape)


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
