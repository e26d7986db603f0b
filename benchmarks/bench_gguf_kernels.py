"""Time the CPU plugin's GGUF-block matmul (gguf_linear.c) against its fp32 panel GEMM (fp32_gemm.c).

SmolLM2-135M's weight shapes [out, in] (576x576 attention, 1536x576 gate/up, 576x1536 down,
49152x576 LM head) at 1, 8, 64 and 512 token rows, for every block format the kernels take;
prints GFLOP/s (2 m n k / time, the fastest of a few calls) per shape, rows and path. The blocks
hold random data with sane scales (only the speed matters here). Re-run on a quiet machine:

    OMP_NUM_THREADS=2 python benchmarks/bench_gguf_kernels.py [--rows 1 8 64 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import numpy as np
import torch
from pagedllm_cpu.kernels import clib

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]  # [out, in]
# Llama-3.2-1B's (--shapes llama1b): attention, gate/up, down
LLAMA_1B = [(2048, 2048), (8192, 2048), (2048, 8192)]
FORMATS = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


def random_blocks(rng: np.random.Generator, qtype: int, n: int, k: int) -> torch.Tensor:
    """uint8 [n, row bytes] of random quants with small positive f16 scales in the scale fields."""
    bw, ts = clib.BLOCK_WEIGHTS[qtype], clib.TYPE_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // bw, ts), dtype=np.uint8)
    scales = (rng.uniform(0.5, 2.0, (n, k // bw, 1)) * 1e-3).astype(np.float16).view(np.uint8)
    if qtype in (12, 13):  # Q4_K / Q5_K: d and dmin first
        raw[..., 0:2] = scales
        raw[..., 2:4] = scales
    elif qtype == 14:  # Q6_K: d last
        raw[..., 208:210] = scales
    else:  # Q4_0 / Q4_1 / Q8_0: d first (Q4_1's min next)
        raw[..., 0:2] = scales
        if qtype == 3:
            raw[..., 2:4] = scales
    return torch.from_numpy(raw.reshape(n, -1))


def seconds(fn, budget: float = 0.5, least: int = 3) -> float:
    fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < least or time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return min(times)  # the least-disturbed call: the machine this was written on is shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 512])
    parser.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    parser.add_argument("--shapes", choices=["smollm2", "llama1b"], default="smollm2")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    kernels = clib.load()
    names = {v: k for k, v in clib.TYPE_NAMES.items()}
    rng = np.random.default_rng(0)
    print(f"kernels: {kernels.isa} build, {torch.get_num_threads()} threads")
    results = []
    for n, k in SHAPES if args.shapes == "smollm2" else LLAMA_1B:
        dense = torch.randn(n, k) * 0.02
        panels = kernels.gemm_pack(dense)
        # K-quants need whole 256-weight super-blocks along k (SmolLM2's 576 is not: llama.cpp's
        # Q4_K_M files keep such tensors in 32-weight formats)
        usable = [f for f in args.formats if k % clib.BLOCK_WEIGHTS[names[f]] == 0]
        blocks = {f: random_blocks(rng, names[f], n, k) for f in usable}
        for m in args.rows:
            x = torch.randn(m, k)
            flops = 2.0 * m * n * k
            row = {"out": n, "in": k, "rows": m}
            row["fp32 panels"] = flops / seconds(functools.partial(kernels.gemm, x, panels, n, None)) / 1e9
            for f in usable:
                row[f] = flops / seconds(functools.partial(kernels.linear, x, names[f], blocks[f], n)) / 1e9
            results.append(row)
            cells = "  ".join(f"{key} {val:6.1f}" for key, val in row.items() if isinstance(val, float))
            print(f"{n:>5}x{k:<5} m={m:<4} GFLOP/s: {cells}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"isa": kernels.isa, "threads": torch.get_num_threads(), "results": results}, fh, indent=1
            )


if __name__ == "__main__":
    main()
