"""Host memory as the platforms whose "device" is the host (CPU, Triton's interpreter) size it.

Free memory is Linux's MemAvailable, not MemFree: the page cache that installs and model loads
fill is reclaimable, and a budget from MemFree (``SC_AVPHYS_PAGES``) shrinks to nothing on a
machine that has merely read a lot of files. Where there is no /proc, sysconf is the fallback.
"""

from __future__ import annotations

import os

MEMINFO = "/proc/meminfo"


def _meminfo_bytes(field: str) -> int | None:
    """A /proc/meminfo field in bytes, or None where the file or the field is missing."""
    try:
        with open(MEMINFO, encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def host_total_memory() -> int:
    """Bytes of RAM on this host."""
    total = _meminfo_bytes("MemTotal")
    return total if total is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_available_memory() -> int:
    """Bytes a new allocation can take without swapping: free memory plus reclaimable page cache."""
    available = _meminfo_bytes("MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
