"""Builds real wheels of out-of-tree plugins (written against pagedllm.plugin alone) and pip-installs them."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

HOOKS_TEMPLATE = '''
"""An out-of-tree pagedllm plugin used by the discovery tests."""
import os
import torch
from pagedllm.plugin import PlatformCandidate, Platform, ReferenceAttentionBackend, hookimpl

PLUGIN_API_VERSION = {api_version!r}


class ExternalPlatform(Platform):
    name = {name!r}
    device_type = "cpu"
    dist_backend = "gloo"
    priority = {priority}
    supported_dtypes = (torch.float32,)
    verified_on = "test double on CPU"

    def device_count(self):
        return 1

    def device_name(self, index=0):
        return "external-test-device"

    def total_memory(self, index=0):
        return 1 << 30

    def free_memory(self, index=0):
        return 1 << 29

    def attention_backend(self, spec):
        return ReferenceAttentionBackend(spec)


@hookimpl
def pagedllm_platform():
    {detect_body}
'''


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def build_wheel(
    out_dir: Path,
    name: str,
    *,
    api_version: tuple[int, int] = (1, 0),
    priority: int = 50,
    detect_body: str | None = None,
) -> Path:
    """A wheel named pagedllm-ext-<name> with entry point ``<name> = ext_<name>.hooks``."""
    pkg = f"ext_{name}"
    dist = f"pagedllm_ext_{name}"
    version = "0.0.1"
    if detect_body is None:
        detect_body = (
            f"return PlatformCandidate({name!r}, '{pkg}.hooks:ExternalPlatform', "
            f"'external test platform', priority={priority})"
        )
    files = {
        f"{pkg}/__init__.py": b"",
        f"{pkg}/hooks.py": textwrap.dedent(HOOKS_TEMPLATE)
        .format(api_version=api_version, name=name, priority=priority, detect_body=detect_body)
        .encode(),
        f"{dist}-{version}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: pagedllm-ext-{name}\nVersion: {version}\n"
        ).encode(),
        f"{dist}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}-{version}.dist-info/entry_points.txt": f"[pagedllm]\n{name} = {pkg}.hooks\n".encode(),
    }
    record_path = f"{dist}-{version}.dist-info/RECORD"
    record = "\n".join(_record_line(p, d) for p, d in files.items()) + f"\n{record_path},,\n"
    wheel = out_dir / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(record_path, record)
    return wheel


def pip_install(wheels: list[Path], target: Path) -> None:
    """Install with pip for real, into a directory the test puts on PYTHONPATH."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--disable-pip-version-check", "--target", str(target), *map(str, wheels)],
        check=True,
    )
