"""Layering rules of DESIGN.md §2, checked on the source tree itself."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENDOR = {"triton", "torch_xla", "jax", "torch_npu", "torch_neuronx", "intel_extension_for_pytorch", "pagedllm_cpu",
          "pagedllm_cuda", "pagedllm_rocm", "pagedllm_tpu", "pagedllm_neuron", "pagedllm_ascend"}
# Portable Triton kernels live in the core behind the optional `triton` extra; only that
# subpackage may import triton, and nothing else in the core may import it.
TRITON_ALLOWED = ROOT / "core" / "src" / "pagedllm" / "kernels"
# The XLA static-shape machinery lives behind the `xla` extra; only kernels/xla may import torch_xla / jax.
XLA_ALLOWED = ROOT / "core" / "src" / "pagedllm" / "kernels" / "xla"


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(module, line, at_module_level) for every import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno, id(node) in top_level))
    return found


def test_core_never_imports_a_plugin_or_vendor_library() -> None:
    bad = []
    for path in (ROOT / "core" / "src").rglob("*.py"):
        for module, line, _ in imports_of(path):
            root = module.split(".")[0]
            if root == "triton" and TRITON_ALLOWED in path.parents:
                continue
            if root in ("torch_xla", "jax") and XLA_ALLOWED in path.parents:
                continue
            if root in VENDOR:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_plugins_import_only_the_public_plugin_api_from_the_core() -> None:
    bad = []
    plugins = sorted(p for p in (ROOT / "plugins").iterdir() if p.is_dir())
    assert {p.name for p in plugins} >= {"cpu", "cuda", "rocm", "tpu", "neuron", "ascend"}
    for plugin in plugins:
        for path in (plugin / "src").rglob("*.py"):
            for module, line, _ in imports_of(path):
                root = module.split(".")[0]
                if root == "pagedllm" and module != "pagedllm.plugin" and not module.startswith("pagedllm.kernels"):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
                if root.startswith("pagedllm_") and root != f"pagedllm_{plugin.name}":
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports another plugin: {module}")
    assert not bad, "\n".join(bad)


def test_plugin_hooks_do_not_import_vendor_libraries_at_module_level() -> None:
    bad = []
    for hooks in (ROOT / "plugins").glob("*/src/*/hooks.py"):
        for module, line, top in imports_of(hooks):
            if top and module.split(".")[0] in VENDOR:
                bad.append(f"{hooks.relative_to(ROOT)}:{line} imports {module} at import time")
    assert not bad, "\n".join(bad)
