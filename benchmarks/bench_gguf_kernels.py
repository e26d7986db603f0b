"""Time the CPU plugin's GGUF-block matmul (gguf_linear.c) against its fp32 panel GEMM (fp32_gemm.c).

SmolLM2-135M's weight shapes [out, in] (576x576 attention, 1536x576 gate/up, 576x1536 down,
49152x576 LM head) at 1, 8, 64 and 512 token rows, for every block format the kernels take;
prints GFLOP/s (2 m n k / time, the fastest of a few calls) per shape, rows and path. The blocks
hold random data with sane scales (only the speed matters here). Re-run on a quiet machine:

    OMP_NUM_THREADS=2 python benchmarks/bench_gguf_kernels.py [--rows 1 8 64 512] [--json out.json]

``--cold`` cycles through copies of each weight totalling > 256 MiB, so every call reads its
weight from memory as a decode step does (a model's weights do not stay in cache between layers).
``--int8-probe`` also times llama.cpp's decode arithmetic on Q4_0 (benchmarks/gguf_int8_probe.c:
activations quantized to int8 per block, AVX-512 VNNI integer dot products; needs avx512_vnni),
and prints both kernels' largest error relative to the sum of |terms| against an fp64 reference.
Where the kernels have AMX, "<format> amx" columns (steps of 16+ rows) time the bf16 AMX-tile path
(tiles packed from the blocks at each step); ``--tiles`` adds the same kernel on kept tiles, bf16
("<format> bf16 tiles", PAGEDLLM_CPU_AMX_TILES=on) and compact ("<format> compact tiles",
PAGEDLLM_CPU_AMX_TILES=compact), packed once from each copy of the weight.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import tempfile
import time
from pathlib import Path

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


def int8_probe() -> ctypes.CDLL:
    """benchmarks/gguf_int8_probe.c, built with the host's cc."""
    out = Path(tempfile.mkdtemp()) / "gguf_int8_probe.so"
    source = Path(__file__).with_name("gguf_int8_probe.c")
    subprocess.run(
        ["cc", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", str(out), str(source)],
        check=True,
    )
    lib = ctypes.CDLL(str(out))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.probe_q4_0_int8.argtypes = [ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
    lib.probe_q4_0_int8.restype = ctypes.c_int
    return lib


def probe_linear(lib: ctypes.CDLL, x: torch.Tensor, blocks: torch.Tensor, n: int) -> torch.Tensor:
    y = torch.empty(x.shape[0], n)
    rc = lib.probe_q4_0_int8(
        x.data_ptr(), x.shape[0], x.shape[1], blocks.data_ptr(), n, y.data_ptr(), torch.get_num_threads()
    )
    if rc != 0:
        raise ValueError(f"the int8 probe rejected x {tuple(x.shape)} (code {rc})")
    return y


def worst_error(y: torch.Tensor, x: torch.Tensor, dense: torch.Tensor) -> float:
    """Largest |y - exact| relative to the sum of |terms| of that output (fp64 reference)."""
    ref = x.double() @ dense.double().T
    scale = x.double().abs() @ dense.double().abs().T
    return float(((y.double() - ref).abs() / scale.clamp_min(1e-30)).max())


class Rotation:
    """Hands out copies of a weight in turn: copies that together exceed the caches (or one copy, hot)."""

    def __init__(self, make, nbytes: int, cold: bool) -> None:
        count = max(1, (256 << 20) // max(nbytes, 1)) if cold else 1
        self.copies = [make() for _ in range(min(count, 512))]
        self.i = 0

    def mapped(self, fn) -> Rotation:
        """A rotation over fn(copy) for each of these copies (e.g. each copy's kept tiles)."""
        out = Rotation(lambda: None, 0, False)
        out.copies = [fn(c) for c in self.copies]
        return out

    def next(self):
        self.i = (self.i + 1) % len(self.copies)
        return self.copies[self.i]


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
    parser.add_argument("--cold", action="store_true", help="read every weight from memory (decode-like)")
    parser.add_argument("--int8-probe", action="store_true", help="also time int8 activations + VNNI on Q4_0")
    parser.add_argument("--tiles", action="store_true", help="also time kept AMX tiles, bf16 and compact")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    kernels = clib.load()
    names = {v: k for k, v in clib.TYPE_NAMES.items()}
    rng = np.random.default_rng(0)
    print(
        f"kernels: {kernels.isa} build, {torch.get_num_threads()} threads, {'cold' if args.cold else 'hot'} weights"
    )
    results = []
    probe = int8_probe() if args.int8_probe else None
    for n, k in SHAPES if args.shapes == "smollm2" else LLAMA_1B:
        dense = torch.randn(n, k) * 0.02
        panels = Rotation(lambda d=dense: kernels.gemm_pack(d), 4 * n * k, args.cold)
        # K-quants need whole 256-weight super-blocks along k (SmolLM2's 576 is not: llama.cpp's
        # Q4_K_M files keep such tensors in 32-weight formats)
        usable = [f for f in args.formats if k % clib.BLOCK_WEIGHTS[names[f]] == 0]
        if probe is not None and "Q4_0" not in usable:
            usable.append("Q4_0")
        blocks, kept = {}, {}
        for f in usable:
            one = random_blocks(rng, names[f], n, k)
            blocks[f] = Rotation(one.clone, one.numel(), args.cold)
        for m in args.rows:
            x = torch.randn(m, k)
            flops = 2.0 * m * n * k
            row = {"out": n, "in": k, "rows": m}
            row["fp32 panels"] = (
                flops / seconds(lambda x=x, p=panels, n=n: kernels.gemm(x, p.next(), n, None)) / 1e9
            )
            for f in usable:
                q, rot = names[f], blocks[f]
                row[f] = flops / seconds(lambda x=x, q=q, r=rot, n=n: kernels.linear(x, q, r.next(), n)) / 1e9
                if kernels.int8_takes(q, k):  # gguf_int8.c: int8 activations, VNNI dot products
                    row[f + " int8"] = (
                        flops / seconds(lambda x=x, q=q, r=rot, n=n: kernels.linear(x, q, r.next(), n, int8=True)) / 1e9
                    )
                if kernels.amx_bf16 and m >= 16:  # bf16 AMX tiles packed from the blocks (batched steps)
                    row[f + " amx"] = (
                        flops / seconds(lambda x=x, q=q, r=rot, n=n: kernels.linear(x, q, r.next(), n, amx=True)) / 1e9
                    )
                    for label, compact in (("bf16 tiles", False), ("compact tiles", True)) if args.tiles else ():
                        key = (f, compact)
                        if key not in kept:  # packed once per copy, like PAGEDLLM_CPU_AMX_TILES=on / compact
                            kept[key] = rot.mapped(lambda c, q=q, n=n, z=compact: kernels.amx_pack(q, c, n, compact=z))
                        row[f"{f} {label}"] = (
                            flops / seconds(lambda x=x, t=kept[key], n=n: kernels.amx_tiles_linear(x, t.next(), n)) / 1e9
                        )
            if probe is not None:
                rot = blocks["Q4_0"]
                row["Q4_0 int8+VNNI"] = (
                    flops / seconds(lambda x=x, r=rot, n=n: probe_linear(probe, x, r.next(), n)) / 1e9
                )
                w = rot.copies[0]
                exact = kernels.dequantize(names["Q4_0"], w, k)
                row["error fp32"] = worst_error(kernels.linear(x, names["Q4_0"], w, n), x, exact)
                row["error int8"] = worst_error(probe_linear(probe, x, w, n), x, exact)
            results.append(row)
            cells = "  ".join(
                f"{key} {val:.1e}" if key.startswith("error") else f"{key} {val:6.1f}"
                for key, val in row.items()
                if isinstance(val, float)
            )
            print(f"{n:>5}x{k:<5} m={m:<4} GFLOP/s: {cells}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"isa": kernels.isa, "threads": torch.get_num_threads(), "results": results}, fh, indent=1
            )


if __name__ == "__main__":
    main()
