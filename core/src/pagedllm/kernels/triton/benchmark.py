"""Kernel benchmark for the Triton backends: ``python -m pagedllm.kernels.triton.benchmark --platform cuda``.

Times the selected platform's attention backend (KV write + paged attention) on decode and
prefill batches, and its registered ops against the torch-native defaults, on the platform's
device. Reports milliseconds and the bandwidth or FLOP rate each case achieves. Under the
Triton interpreter (PAGEDLLM_TRITON_INTERPRET=1) only ``--quick`` sizes are allowed and the
numbers measure the interpreter, not a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from pagedllm.attention.backend import AttentionBatch, AttentionSpec
from pagedllm.config import parse_dtype
from pagedllm.kernels.interpret import interpreter_active
from pagedllm.ops import native
from pagedllm.ops.registry import OPS
from pagedllm.platforms.discovery import current_selection


@dataclass(slots=True)
class Measurement:
    case: str
    impl: str
    ms: float
    rate: str  # GB/s or TFLOP/s, whichever bounds the case


@dataclass(frozen=True, slots=True)
class AttentionCase:
    name: str
    num_seqs: int
    query_len: int
    context_len: int  # tokens already cached per sequence
    num_heads: int = 32
    num_kv_heads: int = 8
    head_size: int = 128
    block_size: int = 16


FULL_CASES = [
    AttentionCase("decode bs64 ctx1k", 64, 1, 1024),
    AttentionCase("decode bs64 ctx4k", 64, 1, 4096),
    AttentionCase("decode bs256 ctx512", 256, 1, 512),
    AttentionCase("prefill 4x512", 4, 512, 0),
    AttentionCase("chunked prefill 4x256 +2k ctx", 4, 256, 2048),
]
QUICK_CASES = [
    AttentionCase("decode bs4 ctx40", 4, 1, 40, num_heads=4, num_kv_heads=2, head_size=32, block_size=8),
    AttentionCase("prefill 2x24", 2, 24, 0, num_heads=4, num_kv_heads=2, head_size=32, block_size=8),
]


def time_ms(fn: Callable[[], object], device: torch.device, interpreted: bool) -> float:
    """Median wall time of fn on device (one timed run under the interpreter: it is that slow)."""
    if interpreted or device.type == "cpu":
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100))


def bench_attention(case: AttentionCase, platform, dtype, device, interpreted) -> Measurement:  # type: ignore[no-untyped-def]
    spec = AttentionSpec(case.num_heads, case.num_kv_heads, case.head_size, case.head_size**-0.5, dtype, case.block_size)
    backend = platform.attention_backend(spec)
    seq_len = case.context_len + case.query_len
    blocks_per_seq = -(-seq_len // case.block_size)
    num_blocks = case.num_seqs * blocks_per_seq
    order = torch.randperm(num_blocks).tolist()  # scattered blocks, as after a while of serving
    tables = [order[i * blocks_per_seq : (i + 1) * blocks_per_seq] for i in range(case.num_seqs)]
    batch = backend.build_metadata(
        AttentionBatch.build([case.query_len] * case.num_seqs, [seq_len] * case.num_seqs, tables, case.block_size, device)
    )
    n = batch.num_tokens
    q = torch.randn(n, case.num_heads, case.head_size, dtype=dtype, device=device)
    k = torch.randn(n, case.num_kv_heads, case.head_size, dtype=dtype, device=device)
    v = torch.randn_like(k)
    kv_cache = backend.allocate_kv_cache(num_blocks, device).normal_()
    ms = time_ms(lambda: backend.forward(q, k, v, kv_cache, batch), device, interpreted)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if case.query_len == 1:  # decode is bound by reading the cache
        read = case.num_seqs * seq_len * case.num_kv_heads * case.head_size * 2 * itemsize
        rate = f"{read / ms / 1e6:.1f} GB/s (KV read)"
    else:  # causal prefill: about half of the q_len x seq_len score matrix, QK^T and PV
        pairs = case.num_seqs * case.query_len * (case.context_len + (case.query_len + 1) / 2)
        flops = 4 * pairs * case.num_heads * case.head_size
        rate = f"{flops / ms / 1e9:.2f} TFLOP/s"
    return Measurement(case.name, backend.name, ms, rate)


def bench_ops(quick: bool, dtype, device, interpreted) -> list[Measurement]:  # type: ignore[no-untyped-def]
    tokens, hidden, inter = (8, 64, 96) if quick else (4096, 4096, 11008)
    x = torch.randn(tokens, hidden, dtype=dtype, device=device)
    residual, weight = torch.randn_like(x), torch.ones(hidden, dtype=dtype, device=device)
    gate_up = torch.randn(tokens, 2 * inter, dtype=dtype, device=device)
    heads, kv_heads, head_size = (4, 2, 32) if quick else (32, 8, 128)
    q = torch.randn(tokens, heads, head_size, dtype=dtype, device=device)
    k = torch.randn(tokens, kv_heads, head_size, dtype=dtype, device=device)
    positions = torch.arange(tokens, device=device)
    cos_sin = torch.randn(tokens, head_size, device=device)
    itemsize = x.element_size()
    cases: list[tuple[str, str, tuple, int]] = [
        ("rms_norm", f"rms_norm {tokens}x{hidden}", (x, weight, 1e-6), 2 * x.numel() * itemsize),
        ("fused_add_rms_norm", f"fused_add_rms_norm {tokens}x{hidden}", (x, residual, weight, 1e-6), 4 * x.numel() * itemsize),
        ("silu_and_mul", f"silu_and_mul {tokens}x{2 * inter}", (gate_up,), int(1.5 * gate_up.numel() * itemsize)),
        ("rotary_embedding", f"rotary {tokens}x{heads}+{kv_heads}x{head_size}", (positions, q, k, cos_sin),
         2 * (q.numel() + k.numel()) * itemsize),
    ]
    out = []
    for op, label, args, nbytes in cases:
        for impl, fn in ((OPS.owner(op), getattr(OPS, op)), ("torch native", getattr(native, op))):
            ms = time_ms(lambda fn=fn, args=args: fn(*args), device, interpreted)
            out.append(Measurement(label, impl, ms, f"{nbytes / ms / 1e6:.1f} GB/s"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagedllm.kernels.triton.benchmark", description=__doc__)
    parser.add_argument("--platform", default=None, help="platform plugin to benchmark (default: the selected one)")
    parser.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: the platform's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the only sizes the interpreter allows)")
    parser.add_argument("--json", default=None, metavar="OUT.json", help="also write the measurements here")
    args = parser.parse_args(argv)

    selection = current_selection(args.platform)  # also registers the plugin's ops
    platform = selection.platform
    interpreted = interpreter_active()
    if interpreted and not args.quick:
        parser.error("the Triton interpreter runs only --quick sizes; on a GPU drop PAGEDLLM_TRITON_INTERPRET")
    dtype = parse_dtype(args.dtype) if args.dtype else platform.default_dtype()
    device = platform.device()
    torch.manual_seed(0)
    print(f"platform {selection.plugin.name}: {platform.device_name()} ({platform.verified_on}), dtype {dtype}")
    results = [bench_attention(c, platform, dtype, device, interpreted) for c in (QUICK_CASES if args.quick else FULL_CASES)]
    results += bench_ops(args.quick, dtype, device, interpreted)
    width = max(len(r.case) for r in results)
    for r in results:
        print(f"{r.case:<{width}}  {r.impl:<24} {r.ms:10.3f} ms  {r.rate}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"platform": selection.plugin.name, "device": platform.device_name(),
                       "verified_on": platform.verified_on, "dtype": str(dtype),
                       "results": [asdict(r) for r in results]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
