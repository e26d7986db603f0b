"""`pagedllm env`: installed plugins, whether each is usable and why, and the one selected."""

from __future__ import annotations

import platform as py_platform
import sys

from pagedllm.errors import PlatformError
from pagedllm.platforms.discovery import discover_plugins, format_plugin_table, select_platform
from pagedllm.plugin_version import PLUGIN_API_VERSION


def print_env(platform_name: str | None = None) -> int:
    """Print the environment report; returns a process exit code (non-zero if nothing selectable)."""
    import torch

    import pagedllm

    print(f"pagedllm        {pagedllm.__version__} (plugin API {PLUGIN_API_VERSION[0]}.{PLUGIN_API_VERSION[1]})")
    print(f"python          {sys.version.split()[0]} ({py_platform.platform()})")
    print(f"torch           {torch.__version__} (cuda {torch.version.cuda}, hip {torch.version.hip})")
    print(f"cpu threads     {torch.get_num_threads()}")
    print()
    plugins = discover_plugins()
    try:
        selection = select_platform(platform_name, plugins=plugins)
    except PlatformError as exc:
        print(format_plugin_table(plugins))
        print()
        print(f"selected: none\n{exc.message.splitlines()[0]}")
        return 1
    print(format_plugin_table(plugins, selection.plugin.name))
    print()
    p = selection.platform
    print(f"selected: {selection.plugin.name} — {selection.why}")
    print(f"  device        {p.device_name()} x{p.device_count()} ({p.device_type}, dist backend {p.dist_backend})")
    print(f"  memory        {p.total_memory() / 2**30:.1f} GiB total, {p.free_memory() / 2**30:.1f} GiB free")
    dtypes = ", ".join(str(d).removeprefix("torch.") for d in p.supported_dtypes)
    print(f"  dtypes        {dtypes} (default {str(p.default_dtype()).removeprefix('torch.')})")
    print(f"  verified on   {p.verified_on}")
    for key, value in p.describe().items():
        print(f"  {key:<13} {value}")
    return 0
