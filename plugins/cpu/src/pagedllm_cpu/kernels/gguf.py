"""GGUF-block matmuls for small batches: ``gguf_linear.c`` built with the host's C compiler, called via ctypes.

A decode step multiplies a few rows by every weight once, so it runs at memory speed; keeping a
GGUF checkpoint's Q4_0 / Q4_1 / Q8_0 blocks packed reads 5-8.5 bits per weight instead of 32. The
weights are dequantized in registers to exactly the fp32 values the loader's dequantization gives,
and the arithmetic is fp32; only the summation order differs from a dense sgemm.

The library is compiled on first use (``-O3 -march=native -fopenmp``, about a second) into a cache
directory keyed by the source, the compiler and the flags: ``$PAGEDLLM_CPU_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/pagedllm`` or ``~/.cache/pagedllm``. Without a compiler (or when
``PAGEDLLM_CPU_GGUF_KERNELS=0``) the kernels are unavailable, ``pagedllm env`` says why, and the
model runs on its dense fp32 weights: same results, more memory traffic.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

KERNELS_ENV = "PAGEDLLM_CPU_GGUF_KERNELS"  # auto (default) | 0 | 1 (required)
CACHE_ENV = "PAGEDLLM_CPU_KERNEL_CACHE"
SOURCE = Path(__file__).with_name("gguf_linear.c")
# GGML type id -> bytes per block of 32 weights.
TYPE_SIZES = {2: 18, 3: 20, 8: 34}  # Q4_0, Q4_1, Q8_0
TYPE_NAMES = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")


class KernelUnavailable(RuntimeError):
    """The GGUF kernels cannot be built or loaded here; the message says why."""


@dataclass(frozen=True, slots=True)
class GGUFKernels:
    lib: ctypes.CDLL
    path: str

    def linear(self, x: torch.Tensor, qtype: int, packed: torch.Tensor, out_features: int) -> torch.Tensor:
        """x [m, k] fp32 contiguous @ W^T, W given as packed [out_features, k / 32 * type_size] uint8."""
        m, k = x.shape
        y = torch.empty((m, out_features), dtype=torch.float32)
        rc = self.lib.pagedllm_gguf_linear(
            qtype,
            x.data_ptr(),
            m,
            k,
            packed.data_ptr(),
            out_features,
            packed.shape[1],
            y.data_ptr(),
            torch.get_num_threads(),
        )
        if rc != 0:
            raise ValueError(
                f"gguf_linear rejected its inputs (code {rc}): type {qtype}, x {tuple(x.shape)}, "
                f"packed {tuple(packed.shape)}"
            )
        return y

    def dequantize(self, qtype: int, packed: torch.Tensor, k: int) -> torch.Tensor:
        """The packed rows as fp32 [rows, k], by the kernel's own dequantization (for tests)."""
        out = torch.empty((packed.shape[0], k), dtype=torch.float32)
        rc = self.lib.pagedllm_gguf_dequantize(qtype, packed.data_ptr(), packed.shape[0], k, out.data_ptr())
        if rc != 0:
            raise ValueError(f"gguf_dequantize rejected type {qtype} with k={k} (code {rc})")
        return out


def wanted() -> str:
    """``auto``, ``0`` or ``1`` from PAGEDLLM_CPU_GGUF_KERNELS; anything else is a readable error."""
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "0", "1"):
        raise ValueError(f"{KERNELS_ENV}={value!r}: expected auto, 0 or 1")
    return value


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pagedllm"


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise KernelUnavailable("no C compiler found (set CC or install gcc)")


def _compiler_id(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelUnavailable(f"{cc} --version failed: {exc}") from None
    return done.stdout.splitlines()[0] if done.stdout else cc


def build() -> Path:
    """Compile the library unless the cache already holds this source built by this compiler."""
    cc = _compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + _compiler_id(cc).encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"gguf_linear-{key}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KernelUnavailable(f"cannot create the kernel cache {target.parent}: {exc.strerror}") from None
    # Build beside the target and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300, check=False
        )
        if done.returncode != 0:
            raise KernelUnavailable(f"{cc} failed to build {SOURCE.name}: {done.stderr.strip()[-400:]}")
        os.replace(tmp, target)
    except subprocess.TimeoutExpired:
        raise KernelUnavailable(f"{cc} took over 300 s to build {SOURCE.name}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built CPU GGUF kernels with %s: %s", cc, target)
    return target


@functools.cache
def load() -> GGUFKernels:
    """The kernels, built and loaded once per process; KernelUnavailable says why not."""
    if wanted() == "0":
        raise KernelUnavailable(f"disabled by {KERNELS_ENV}=0")
    path = build()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelUnavailable(f"cannot load {path}: {exc}") from None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.pagedllm_gguf_linear.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, i64, ptr, ctypes.c_int]
    lib.pagedllm_gguf_linear.restype = ctypes.c_int
    lib.pagedllm_gguf_dequantize.argtypes = [ctypes.c_int, ptr, i64, i64, ptr]
    lib.pagedllm_gguf_dequantize.restype = ctypes.c_int
    return GGUFKernels(lib, str(path))


def status() -> tuple[GGUFKernels | None, str]:
    """(kernels or None, a one-line description for ``pagedllm env``)."""
    try:
        kernels = load()
    except KernelUnavailable as exc:
        return None, f"not used: {exc}"
    types = ", ".join(TYPE_NAMES[t] for t in sorted(TYPE_NAMES))
    return kernels, f"used for {types} weights at up to {{rows}} rows ({kernels.path})"
