"""Returning the heap a model load freed to the OS.

Loading a GGUF file allocates and frees a lot (the metadata's strings, the tokenizer's build, the
dequantization buffers of the loader threads, each thread with its own glibc arena); glibc keeps
freed memory in its arenas, where it stays resident. ``malloc_trim`` hands it back: 83 MiB of a
served 1B-shape Q4_K_M's engine process (measured, benchmarks/peers/run_peers.py's model).
"""

from __future__ import annotations

import ctypes
import logging
import sys

logger = logging.getLogger(__name__)


def return_freed_heap() -> bool:
    """``malloc_trim(0)`` where the C library is glibc; whether it ran (musl, macOS: nothing to do)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError) as exc:  # not glibc
        logger.debug("malloc_trim unavailable: %s", exc)
        return False
    trim(0)
    return True
