"""malloc.py: glibc keeps a step's activation blocks on its heap in the model's process."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import pytest
from pagedllm.plugin import ConfigError, EngineConfig
from pagedllm_cpu import malloc as cpu_malloc
from pagedllm_cpu.platform import CpuPlatform

GLIBC = platform.libc_ver()[0] == "glibc"


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def test_a_bad_switch_is_a_readable_error_at_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_malloc.MALLOC_ENV, "tcmalloc")
    with pytest.raises(ValueError, match="PAGEDLLM_CPU_MALLOC='tcmalloc': expected one of auto, off"):
        cpu_malloc.mode()
    with pytest.raises(ConfigError, match="PAGEDLLM_CPU_MALLOC='tcmalloc'"):
        CpuPlatform().check_and_update_config(EngineConfig())
    assert "PAGEDLLM_CPU_MALLOC='tcmalloc'" in cpu_malloc.describe()


def test_off_leaves_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_malloc.MALLOC_ENV, "off")
    monkeypatch.setattr(cpu_malloc, "_applied", None)
    assert cpu_malloc.tune() == "glibc defaults (PAGEDLLM_CPU_MALLOC=off)"
    assert cpu_malloc.describe() == cpu_malloc.tune()  # once, then reported as done


_PROBE = """
import ctypes, ctypes.util, json
from pagedllm_cpu import malloc
class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in {fields!r}]
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.mallinfo2.restype = _MallInfo2
libc.malloc.restype = ctypes.c_void_p
said = malloc.tune()
before = libc.mallinfo2().hblks  # blocks glibc mapped on their own
blocks = [libc.malloc(24 << 20) for _ in range(3)]  # above glibc's default threshold, below ours
mapped = libc.mallinfo2().hblks - before
big = libc.malloc(malloc.MMAP_THRESHOLD + (1 << 20))  # past ours: its own mapping still
print(json.dumps([said, mapped, libc.mallinfo2().hblks - before - mapped, all(blocks) and bool(big)]))
"""


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
@pytest.mark.parametrize("switch", ["auto", "off"])
def test_blocks_of_a_few_mib_come_from_the_heap_once_tuned(switch: str) -> None:
    """In a fresh process (no freed blocks to reuse): 24 MiB blocks are mapped one by one with glibc's
    defaults and come from the heap once tuned; a block past MMAP_THRESHOLD is mapped either way."""
    import json
    import os
    import subprocess
    import sys

    if not hasattr(_libc(), "mallinfo2"):
        pytest.skip("glibc without mallinfo2 (< 2.33)")
    env = {**os.environ, cpu_malloc.MALLOC_ENV: switch}
    code = _PROBE.format(fields=[name for name, _ in _MallInfo2._fields_])
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    said, mapped, big_mapped, allocated = json.loads(done.stdout.strip().splitlines()[-1])
    assert allocated and big_mapped == 1
    if switch == "auto":
        assert said.startswith("glibc heap keeps blocks up to 32 MiB") and mapped == 0
    else:
        assert said == "glibc defaults (PAGEDLLM_CPU_MALLOC=off)" and mapped == 3
