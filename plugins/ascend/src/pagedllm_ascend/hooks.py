"""Entry point of pagedllm-ascend: cheap detection (never imports torch_npu or triton) and registration.

NPUs are found from the driver's device nodes (``/dev/davinci<N>`` next to ``/dev/davinci_manager``),
the driver's install folder, ``ASCEND_RT_VISIBLE_DEVICES`` and whether CANN's runtime libraries
can be found, all without loading them: importing torch_npu needs CANN and, once installed,
changes what ``import torch`` does (see ``npu.py``).
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import re

from pagedllm.kernels.interpret import ENV_VAR as INTERPRET_VAR
from pagedllm.kernels.interpret import interpreter_requested
from pagedllm.plugin import PlatformCandidate, PluginRegistry, hookimpl

PLUGIN_API_VERSION = (1, 0)
PRIORITY = 100  # an accelerator beats the CPU platform (10)
DRIVER_DIRS = ("/usr/local/Ascend/driver",)
CANN_HOMES = ("/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/cann", "/usr/local/Ascend/latest")
# The runtime torch_npu links against, and the collective library HCCL ("libhccl.so missing" is
# the error `import torch_npu` gives without CANN).
CANN_LIBRARIES = ("libascendcl.so", "libhccl.so")


def npu_device_nodes(dev: str = "/dev") -> list[str]:
    """/dev/davinci<N> nodes (davinci_manager and davinci<N>_... control nodes excluded)."""
    return sorted(p for p in glob.glob(os.path.join(dev, "davinci*")) if re.fullmatch(r"davinci\d+", os.path.basename(p)))


def driver_dir() -> str | None:
    """The Ascend driver's install folder (holds version.info), if any."""
    for path in DRIVER_DIRS:
        if os.path.isdir(path):
            return path
    return None


def visible_devices(nodes: list[str]) -> tuple[int, str]:
    """(NPUs this process may use, "") after ASCEND_RT_VISIBLE_DEVICES, or (0, why none)."""
    value = os.environ.get("ASCEND_RT_VISIBLE_DEVICES", None)
    if value is None:
        return len(nodes), ""
    ids = [v.strip() for v in value.split(",") if v.strip()]
    if not ids or ids == ["-1"]:
        return 0, f"ASCEND_RT_VISIBLE_DEVICES={value!r} hides every NPU"
    present = {os.path.basename(n).removeprefix("davinci") for n in nodes}
    missing = [i for i in ids if i not in present]
    if missing:
        return 0, f"ASCEND_RT_VISIBLE_DEVICES={value!r} names NPU(s) {', '.join(missing)} with no /dev/davinci node"
    return len(ids), ""


def cann_library_dirs() -> list[str]:
    """Folders where CANN's runtime libraries may live: LD_LIBRARY_PATH, ASCEND_HOME_PATH, the default installs."""
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    for var in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME"):
        if os.environ.get(var):
            dirs.append(os.path.join(os.environ[var], "lib64"))
    dirs += [os.path.join(home, "lib64") for home in CANN_HOMES]
    return dirs


def missing_cann_libraries(dirs: list[str] | None = None) -> list[str]:
    """CANN libraries not found in any of ``dirs`` (found by file name, never loaded)."""
    dirs = cann_library_dirs() if dirs is None else dirs
    return [lib for lib in CANN_LIBRARIES if not any(os.path.exists(os.path.join(d, lib)) for d in dirs)]


def torch_npu_version() -> str | None:
    """torch_npu's installed version from package metadata (no import), or None."""
    if importlib.util.find_spec("torch_npu") is None:
        return None
    try:
        return importlib.metadata.version("torch-npu")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def triton_ascend_version() -> str | None:
    """triton-ascend's version when it is the installed ``triton`` (it replaces the regular wheel)."""
    try:
        return importlib.metadata.version("triton-ascend")
    except importlib.metadata.PackageNotFoundError:
        return None


def detect() -> tuple[bool, str]:
    """(usable, reason): whether this machine can run the Ascend backend, and the specific why."""
    # Cheap, but a hooks module imports nothing of its own package at load time.
    from pagedllm_ascend.settings import attention_path

    nodes = npu_device_nodes()
    driver = driver_dir()
    if not nodes:
        detail = "" if driver else f"; no Ascend driver ({DRIVER_DIRS[0]} missing)"
        return False, f"no Ascend NPU (no /dev/davinci<N> device node){detail}"
    if driver is None:
        return False, f"{len(nodes)} /dev/davinci node(s) but no Ascend driver install ({DRIVER_DIRS[0]} missing)"
    count, hidden = visible_devices(nodes)
    if count == 0:
        return False, hidden
    missing = missing_cann_libraries()
    if missing:
        return False, (f"{count} Ascend NPU(s) but CANN's {', '.join(missing)} not found: install the CANN toolkit "
                       "and `source /usr/local/Ascend/ascend-toolkit/set_env.sh`")
    version = torch_npu_version()
    if version is None:
        return False, f"{count} Ascend NPU(s) and CANN, but torch_npu is not installed (pip install 'pagedllm-ascend[npu]')"
    path = attention_path()
    if path == "triton" and triton_ascend_version() is None:
        return False, "attention path 'triton' needs triton-ascend (pip install 'pagedllm-ascend[triton]')"
    return True, f"{count} Ascend NPU(s) via /dev/davinci*, CANN found, torch_npu {version}, attention: {path}"


def interpreter_candidate(reason: str) -> PlatformCandidate:
    """The CPU twin: the Triton path under triton-ascend's interpreter, chosen only by name."""
    from pagedllm_ascend.settings import requested_attention_path

    version = triton_ascend_version()
    if version is None:
        found = "the regular triton" if importlib.util.find_spec("triton") else "no triton"
        return PlatformCandidate("ascend", None, f"{INTERPRET_VAR}=1 but triton-ascend is not installed ({found} is)")
    if requested_attention_path() == "fused":
        return PlatformCandidate("ascend", None, f"{INTERPRET_VAR}=1 runs the Triton path only; "
                                 "PAGEDLLM_ASCEND_ATTENTION=fused needs torch_npu on an NPU")
    return PlatformCandidate("ascend", "pagedllm_ascend.kernels.interpreter_platform:AscendInterpreterPlatform",
                             f"triton-ascend {version} interpreter on CPU; NPU: {reason}", priority=0)


@hookimpl
def pagedllm_platform() -> PlatformCandidate:
    try:
        usable, reason = detect()
    except ValueError as exc:  # an unknown PAGEDLLM_ASCEND_ATTENTION value
        return PlatformCandidate("ascend", None, str(exc))
    if interpreter_requested():
        return interpreter_candidate(reason)
    if not usable:
        return PlatformCandidate("ascend", None, f"{reason}; interpreter: {INTERPRET_VAR}=1 with triton-ascend")
    return PlatformCandidate("ascend", "pagedllm_ascend.platform:AscendPlatform", reason, priority=PRIORITY)


@hookimpl
def pagedllm_register(registry: PluginRegistry) -> None:
    from pagedllm_ascend.ops import register_ops

    register_ops(registry)
