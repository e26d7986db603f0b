"""Broken Triton backends: each takes the real kernel source, plants one bug, and runs it in interpreter mode.

A bug is a single source edit of a shared kernel module (asserted to match exactly once, so a
refactor of the kernel fails loudly instead of planting nothing). The edited module is written
to a temporary file and imported, so Triton sees ordinary source, on a GPU as under the
interpreter. Each planted platform is the CUDA interpreter platform with one kernel swapped.
"""

from __future__ import annotations

import atexit
import importlib.util
import inspect
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType

import pagedllm.kernels.triton  # noqa: F401  (applies PAGEDLLM_TRITON_INTERPRET before triton loads)
from pagedllm.kernels.triton import LaunchConfig, activation, kv_write, paged_attention
from pagedllm.plugin import PluginRegistry
from pagedllm_cuda import hooks as cuda_hooks
from pagedllm_cuda.attention import CudaAttentionBackend
from pagedllm_cuda.platform import CudaInterpreterPlatform


@dataclass(frozen=True, slots=True)
class SourceEdit:
    module: ModuleType
    old: str
    new: str


_WORKDIR = Path(tempfile.mkdtemp(prefix="pagedllm-planted-triton-"))
atexit.register(shutil.rmtree, _WORKDIR, True)


def planted_module(name: str, edit: SourceEdit) -> ModuleType:
    """Import a copy of ``edit.module`` with ``edit.old`` replaced by ``edit.new``."""
    source = inspect.getsource(edit.module)
    if source.count(edit.old) != 1:
        raise AssertionError(f"planted bug {name}: {edit.old!r} occurs {source.count(edit.old)} times in {edit.module.__name__}")
    path = _WORKDIR / f"{name}.py"
    path.write_text(source.replace(edit.old, edit.new))
    spec = importlib.util.spec_from_file_location(f"triton_planted.generated.{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SLOT_OFF_BY_ONE = planted_module("kv_write_slot_plus_one", SourceEdit(
    kv_write,
    "    heads = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)\n",
    "    slot = slot + 1\n    heads = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)\n",
))
DROPPED_LAST_BLOCK = planted_module("attention_drops_last_block", SourceEdit(
    paged_attention, "    kv_end = last_pos + 1\n", "    kv_end = (last_pos // block_size) * block_size\n",
))
GQA_MODULO = planted_module("attention_gqa_modulo", SourceEdit(
    paged_attention,
    "    head = kv_head * GROUP + rows % GROUP\n",
    "    head = kv_head + (rows % GROUP) * tl.num_programs(2)\n",  # q head h reads KV head h % num_kv_heads
))
DROPPED_SOFT_CAP = planted_module("attention_drops_soft_cap", SourceEdit(
    paged_attention, "            s = soft_cap * _tanh(s / soft_cap)\n", "            s = s\n",
))
WINDOW_OFF_BY_ONE = planted_module("attention_window_plus_one", SourceEdit(
    paged_attention,
    "            visible = visible & (q_pos[:, None] - k_pos[None, :] < window)\n",
    "            visible = visible & (q_pos[:, None] - k_pos[None, :] <= window)\n",
))
SWAPPED_GATE = planted_module("activation_swaps_gate_and_up", SourceEdit(
    activation,
    "    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)\n"
    "    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)\n",
    "    up = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)\n"
    "    gate = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)\n",
))


def register_cuda_ops(registry: PluginRegistry) -> None:
    cuda_hooks.pagedllm_register(registry=registry)


def register_swapped_silu(registry: PluginRegistry) -> None:
    cuda_hooks.pagedllm_register(registry=registry)
    registry.override_op("silu_and_mul", partial(SWAPPED_GATE.silu_and_mul, config=LaunchConfig(block_n=1024)),
                         "planted")


def _backend(write_kv=kv_write.write_kv, attend=paged_attention.paged_attention) -> type[CudaAttentionBackend]:  # type: ignore[no-untyped-def]
    return type("PlantedTritonAttention", (CudaAttentionBackend,), {
        "name": "planted-triton", "write_kv_kernel": staticmethod(write_kv), "attention_kernel": staticmethod(attend),
    })


class SoundTritonPlatform(CudaInterpreterPlatform):
    name = "planted_triton_sound"
    attention_backend_class = _backend()


class SlotOffByOnePlatform(CudaInterpreterPlatform):
    name = "planted_triton_slot"
    attention_backend_class = _backend(write_kv=SLOT_OFF_BY_ONE.write_kv)


class DroppedLastBlockPlatform(CudaInterpreterPlatform):
    name = "planted_triton_lastblock"
    attention_backend_class = _backend(attend=DROPPED_LAST_BLOCK.paged_attention)


class GqaModuloPlatform(CudaInterpreterPlatform):
    name = "planted_triton_gqa"
    attention_backend_class = _backend(attend=GQA_MODULO.paged_attention)


class DroppedSoftCapPlatform(CudaInterpreterPlatform):
    name = "planted_triton_softcap"
    attention_backend_class = _backend(attend=DROPPED_SOFT_CAP.paged_attention)


class WindowOffByOnePlatform(CudaInterpreterPlatform):
    name = "planted_triton_window"
    attention_backend_class = _backend(attend=WINDOW_OFF_BY_ONE.paged_attention)


class SwappedGatePlatform(CudaInterpreterPlatform):
    name = "planted_triton_silu"
    attention_backend_class = _backend()
