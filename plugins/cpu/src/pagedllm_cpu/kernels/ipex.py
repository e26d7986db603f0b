"""The IPEX fast path: detection without importing, and thin wrappers over its paged-attention ops.

``intel_extension_for_pytorch`` is built for one torch major.minor and fails (or crashes) on any
other, so detection compares installed versions through package metadata and imports IPEX only
once the path is selected. Its paged ops take the key and value caches as two
``[num_blocks, num_kv_heads, block_size, head_size]`` tensors: ``kv_cache[0]`` and ``kv_cache[1]``
of the CPU backend's layout. A wrong layout segfaults inside IPEX instead of raising, so the
wrappers check shapes before every call.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pagedllm.plugin import AttentionSpec

if TYPE_CHECKING:
    from pagedllm_cpu.attention import CpuAttentionMetadata

IPEX_ENV = "PAGEDLLM_CPU_IPEX"
_IPEX_MODULE = "intel_extension_for_pytorch"
_IPEX_DIST = "intel-extension-for-pytorch"


@dataclass(frozen=True, slots=True)
class IpexStatus:
    """Whether IPEX could be used here, judged without importing it."""

    usable: bool
    version: str | None
    reason: str  # why not, or what was found


def _major_minor(version: str) -> tuple[int, ...]:
    parts = version.split("+")[0].split(".")[:2]
    return tuple(int(p) for p in parts if p.isdigit())


@functools.cache
def ipex_status() -> IpexStatus:
    """Installed or not, and whether its version matches torch's, from package metadata only."""
    if importlib.util.find_spec(_IPEX_MODULE) is None:
        return judge(installed=False, ipex_version=None, torch_version=torch.__version__)
    try:
        version = importlib.metadata.version(_IPEX_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return judge(installed=True, ipex_version=version, torch_version=torch.__version__)


def judge(installed: bool, ipex_version: str | None, torch_version: str) -> IpexStatus:
    """IPEX X.Y.* is built for torch X.Y.* and nothing else."""
    if not installed:
        return IpexStatus(False, None, f"{_IPEX_MODULE} is not installed")
    if ipex_version is None:
        return IpexStatus(False, None, f"{_IPEX_MODULE} is importable but has no {_IPEX_DIST} metadata")
    if _major_minor(ipex_version) != _major_minor(torch_version):
        wanted = ".".join(map(str, _major_minor(ipex_version)))
        return IpexStatus(
            False,
            ipex_version,
            f"{_IPEX_DIST} {ipex_version} needs torch {wanted}.*, but torch is {torch_version}",
        )
    return IpexStatus(True, ipex_version, f"{_IPEX_DIST} {ipex_version} matches torch {torch_version}")


def ipex_wanted() -> bool:
    """PAGEDLLM_CPU_IPEX: 'auto' (default) uses IPEX when usable, '0' never, '1' requires it."""
    mode = os.environ.get(IPEX_ENV, "auto").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return False
    if mode in ("", "auto"):
        return ipex_status().usable
    if mode in ("1", "on", "true", "yes", "force"):
        status = ipex_status()
        if not status.usable:
            raise RuntimeError(f"{IPEX_ENV}={mode} requires the IPEX fast path, but {status.reason}")
        return True
    raise ValueError(f"{IPEX_ENV}={mode!r}: use auto, 0 or 1")


@functools.cache
def load() -> IpexKernels:
    """Import IPEX (only now) and bind its paged-attention ops; RuntimeError says why not."""
    status = ipex_status()
    if not status.usable:
        raise RuntimeError(status.reason)
    try:
        module = importlib.import_module(_IPEX_MODULE)
        paged = module.llm.modules.PagedAttention
    except Exception as exc:  # an ABI mismatch surfaces as any error type; report its text
        raise RuntimeError(
            f"import {_IPEX_MODULE} {status.version} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return IpexKernels(paged, status.version or "")


class IpexKernels:
    """IPEX's PagedAttention ops on the CPU backend's ``[2, nb, H_kv, bs, D]`` cache."""

    def __init__(self, paged: Any, version: str) -> None:
        self.paged = paged
        self.version = version
        self._head_mappings: dict[tuple[int, int], torch.Tensor] = {}

    def supports(self, spec: AttentionSpec) -> bool:
        """Whether IPEX's kernels compute this layer exactly like the reference (checked in tests)."""
        if spec.sliding_window is None:
            return True
        # IPEX 2.8 rejects a sliding window together with a soft-cap ("!(window_size > 0 &&
        # use_softcap)"), and its varlen prefill reads window_size_left 0 (window 1) as no window.
        return spec.logit_soft_cap is None and spec.sliding_window > 1

    @staticmethod
    def _window(spec: AttentionSpec) -> int:
        return spec.sliding_window if spec.sliding_window is not None else -1

    @staticmethod
    def _check_layout(kv_cache: torch.Tensor, num_kv_heads: int, head_size: int) -> None:
        if (
            kv_cache.dim() != 5
            or kv_cache.shape[0] != 2
            or tuple(kv_cache.shape[2:5:2]) != (num_kv_heads, head_size)
        ):
            raise ValueError(
                f"IPEX needs a [2, num_blocks, {num_kv_heads}, block_size, {head_size}] KV cache, "
                f"got {tuple(kv_cache.shape)}"
            )
        if not kv_cache.is_contiguous():
            raise ValueError("IPEX needs a contiguous KV cache")

    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor
    ) -> None:
        """key/value [n, H_kv, D] -> cache at flat slots [n] (all >= 0)."""
        self._check_layout(kv_cache, key.shape[1], key.shape[2])
        self.paged.reshape_and_cache(key.contiguous(), value.contiguous(), kv_cache[0], kv_cache[1], slots)

    def decode(
        self,
        spec: AttentionSpec,
        query: torch.Tensor,  # [num_tokens, num_heads, D]
        kv_cache: torch.Tensor,
        meta: CpuAttentionMetadata,
        out: torch.Tensor,  # [num_tokens, num_heads, D], decode rows written here
    ) -> None:
        _, _, h, bs, d = kv_cache.shape
        self._check_layout(kv_cache, spec.num_kv_heads, spec.head_size)
        q = query.index_select(0, meta.decode_tokens)  # [n, num_heads, D] contiguous
        o = torch.empty_like(q)
        key = (spec.num_heads, h)
        mapping = self._head_mappings.get(key)
        if mapping is None:
            group = spec.num_heads // h
            mapping = self._head_mappings[key] = torch.arange(h, dtype=torch.int32).repeat_interleave(group)
        tables, lens = meta.ipex_decode_inputs()
        self.paged.single_query_cached_kv_attention(
            o,
            q,
            kv_cache[0],
            kv_cache[1],
            mapping,
            spec.scale,
            tables,
            lens,
            bs,
            max(meta.decode_seq_lens),
            None,
            window_size=self._window(spec),
            softcap=spec.logit_soft_cap if spec.logit_soft_cap is not None else -1.0,
        )
        out.index_copy_(0, meta.decode_tokens, o)

    def prefill(
        self,
        spec: AttentionSpec,
        query: torch.Tensor,  # [num_tokens, num_heads, D]
        kv_cache: torch.Tensor,
        meta: CpuAttentionMetadata,
        out: torch.Tensor,
    ) -> None:
        """Every prefill and prefill chunk in one varlen call over the paged cache (already written)."""
        self._check_layout(kv_cache, spec.num_kv_heads, spec.head_size)
        tokens, cu_q, cu_kv, tables = meta.ipex_prefill_inputs()
        q = query.index_select(0, tokens)
        o = torch.empty_like(q)
        left = spec.sliding_window - 1 if spec.sliding_window is not None else -1
        self.paged.flash_attn_varlen_func(
            o,
            q,
            kv_cache[0],
            kv_cache[1],
            cu_q,
            cu_kv,
            max(p.q_end - p.q_start for p in meta.prefills),
            max(p.seq_len for p in meta.prefills),
            spec.scale,
            True,
            tables,
            None,
            window_size_left=left,
            window_size_right=-1 if left < 0 else 0,
            softcap=spec.logit_soft_cap if spec.logit_soft_cap is not None else -1.0,
        )
        out.index_copy_(0, tokens, o)
