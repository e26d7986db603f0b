"""torch_npu, imported only when an Ascend platform starts, with the errors a user can act on.

torch >= 2.5 imports device-backend extensions such as torch_npu from their entry point during
``import torch`` (device-backend autoload) unless ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``. Where CANN
is missing that import fails, so once torch_npu is installed a plain ``import torch`` breaks
until CANN is set up or autoload is off. Detection therefore never imports torch_npu; the
platform imports it here, explicitly, so it works with autoload on or off.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

import torch
from pagedllm.plugin import PlatformError

AUTOLOAD_VAR = "TORCH_DEVICE_BACKEND_AUTOLOAD"


def autoload_enabled() -> bool:
    """Whether torch imports device backends (torch_npu) on ``import torch`` (its default: on)."""
    return os.environ.get(AUTOLOAD_VAR, "1").strip() not in ("0", "false", "False")


def paired(torch_version: str, npu_version: str) -> bool:
    """torch_npu X.Y.* is built for torch X.Y.* (e.g. torch-npu 2.13.0 with torch 2.13.0)."""
    return torch_version.split("+")[0].split(".")[:2] == npu_version.split("+")[0].split(".")[:2]


def import_torch_npu() -> ModuleType:
    """The torch_npu module: already loaded by autoload, or imported now; a PlatformError if it cannot be."""
    if "torch_npu" in sys.modules:
        return sys.modules["torch_npu"]
    try:
        import torch_npu
    except (ImportError, OSError) as exc:
        raise PlatformError(
            f"import torch_npu failed ({exc}); torch_npu needs the CANN toolkit: install it and run "
            "`source /usr/local/Ascend/ascend-toolkit/set_env.sh` (libascendcl.so, libhccl.so on LD_LIBRARY_PATH)"
        ) from exc
    version = getattr(torch_npu, "__version__", "")
    if version and not paired(torch.__version__, version):
        raise PlatformError(
            f"torch_npu {version} is built for another torch than {torch.__version__}: install the "
            "torch-npu release with torch's major.minor (torch 2.13.0 pairs with torch-npu 2.13.0)"
        )
    return torch_npu
