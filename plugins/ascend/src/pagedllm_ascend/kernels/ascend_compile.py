"""Compile every Triton kernel of the Ascend Triton path for an Ascend target, as far as a machine without CANN can.

triton-ascend lowers a kernel through its own front end to ``.ttir`` (Triton IR) and
``.ttadapter`` (linalg/HIVM MLIR); only the last step, to an NPU binary (``npubin``), runs CANN's
``bishengir`` compiler. This module drives the real launchers (the attention backend's KV write
and paged attention at both launch configurations and the variants the fused path hands over,
and every op override) with CPU tensors of each dtype, while triton's active driver is a
compile-only one that reports an Ascend target: each launch compiles its kernel with exactly the
arguments and constexprs the backend passes, then stops where the binary stage needs CANN.
Run it in a process without TRITON_INTERPRET (the kernels must be compiled functions):

    python -m pagedllm_ascend.kernels.ascend_compile --out ascend-compile
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

from pagedllm_ascend.kernels.launch_configs import ASCEND_ATTENTION
from pagedllm_ascend.kernels.triton_attention import AscendTritonAttentionBackend

DEFAULT_ARCH = "Ascend910B4"
FRONT_END_STAGES = ("ttir", "ttadapter")  # what triton-ascend produces before the CANN-only binary step
BINARY_STAGE = "npubin"


class CompileOnlyDriver:
    """Triton's active driver while compiling: an Ascend target, and no device to launch on."""

    def __init__(self, arch: str) -> None:
        self.target = GPUTarget("npu", arch, 0)

    def is_active(self) -> bool:
        return True

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@dataclass(slots=True)
class Compilation:
    """One kernel launch compiled for the target: the stage files it produced and where it stopped."""

    case: str
    kernels: list[str] = field(default_factory=list)
    stages: dict[str, str] = field(default_factory=dict)  # stage -> file
    stopped_at: str | None = None  # the error that ended compilation (None: reached the binary)


def _attention_launches(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], object]]]:
    backend = AscendTritonAttentionBackend
    heads, kv_heads, head_size, block_size, num_blocks = 8, 2, 128, 128, 4
    cache = torch.zeros(2, num_blocks, block_size, kv_heads, head_size, dtype=dtype)
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    key = torch.zeros(3, kv_heads, head_size, dtype=dtype)
    yield "kv_write", lambda: backend.write_kv_kernel(key, key, cache[0], cache[1], torch.arange(3),
                                                      ASCEND_ATTENTION.kv_write)
    prefill = (torch.tensor([0, 2, 3], dtype=torch.int32), torch.tensor([130, 200], dtype=torch.int32), 2)
    decode = (torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([130, 200], dtype=torch.int32), 1)
    variants = {"": {}, "_sliding_window": {"sliding_window": 64}, "_soft_cap": {"soft_cap": 30.0}}
    for step, (starts, seq_lens, max_q), config in (("prefill", prefill, ASCEND_ATTENTION.prefill),
                                                    ("decode", decode, ASCEND_ATTENTION.decode)):
        query = torch.zeros(int(starts[-1]), heads, head_size, dtype=dtype)
        for suffix, extra in variants.items():
            yield f"paged_attention_{step}{suffix}", (
                lambda q=query, s=starts, n=seq_lens, m=max_q, c=config, e=extra: backend.attention_kernel(
                    q, cache[0], cache[1], tables, s, n, max_query_len=m, scale=head_size**-0.5, config=c, **e))


def _op_launches(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], object]]]:
    from pagedllm_ascend.ops import triton_ops

    hidden, heads, kv_heads, head_size = 2048, 8, 2, 128
    x, weight = torch.zeros(4, hidden, dtype=dtype), torch.ones(hidden, dtype=dtype)
    positions = torch.arange(4)
    cos_sin = torch.zeros(64, head_size, dtype=torch.float32)
    q, k = torch.zeros(4, heads, head_size, dtype=dtype), torch.zeros(4, kv_heads, head_size, dtype=dtype)
    samples: dict[str, tuple] = {
        "rms_norm": (x, weight, 1e-6),
        "fused_add_rms_norm": (x, x, weight, 1e-6),
        "rotary_embedding": (positions, q, k, cos_sin),
        "silu_and_mul": (torch.zeros(4, 2 * hidden, dtype=dtype),),
        "gelu_tanh_and_mul": (torch.zeros(4, 2 * hidden, dtype=dtype),),
    }
    for name, fn in triton_ops().items():
        yield f"op_{name}", lambda fn=fn, args=samples[name]: fn(*args)  # KeyError: a new op needs a sample


def launches(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], object]]]:
    """(case, launch) for every kernel launch the Triton path makes."""
    yield from _attention_launches(dtype)
    yield from _op_launches(dtype)


def compile_case(case: str, launch: Callable[[], object], out_dir: Path, arch: str = DEFAULT_ARCH) -> Compilation:
    """Run one launch under the compile-only driver; collect the stage files it left in its cache dir."""
    case_dir = out_dir / case
    case_dir.mkdir(parents=True, exist_ok=True)
    result = Compilation(case)
    previous = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(case_dir)  # triton reads it per compilation
    driver.set_active(CompileOnlyDriver(arch))
    try:
        launch()
    except Exception as exc:  # noqa: BLE001  (the binary stage's CANN error is the expected end)
        result.stopped_at = f"{type(exc).__name__}: {exc}".strip()[:2000]
    finally:
        driver.reset_active()
        if previous is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = previous
    for path in sorted(case_dir.rglob("*")):
        stage = path.suffix.lstrip(".")
        if path.is_file() and stage in (*FRONT_END_STAGES, BINARY_STAGE):
            result.stages[stage] = str(path)
            if path.stem not in result.kernels:
                result.kernels.append(path.stem)
    if BINARY_STAGE in result.stages:  # with CANN it compiled fully; only the launch had no device
        result.stopped_at = None
    return result


def compile_all(out_dir: Path, arch: str = DEFAULT_ARCH,
                dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)) -> list[Compilation]:
    """Compile every launch of the Triton path for ``arch``, one case per (launch, dtype)."""
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: kernels run under the interpreter and cannot be compiled")
    results = []
    for dtype in dtypes:
        tag = str(dtype).removeprefix("torch.")
        for case, launch in launches(dtype):
            results.append(compile_case(f"{case}_{tag}", launch, out_dir, arch))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the stage files and report.json")
    parser.add_argument("--arch", default=DEFAULT_ARCH, help=f"Ascend SoC name (default {DEFAULT_ARCH})")
    args = parser.parse_args(argv)
    results = compile_all(args.out, args.arch)
    (args.out / "report.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    incomplete = [r.case for r in results if not all(s in r.stages for s in FRONT_END_STAGES)]
    for r in results:
        print(f"{r.case:45s} {' '.join(sorted(r.stages)):28s} {', '.join(r.kernels)}")
    print(f"triton-ascend {triton.__version__}, target {args.arch}: {len(results) - len(incomplete)}/{len(results)} "
          f"launches compiled through {'/'.join(FRONT_END_STAGES)}")
    return 1 if incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
