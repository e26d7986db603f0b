"""Where a batched decode step's time goes on the CPU: each kernel of a captured step, timed one by one.

Runs ``--num-prompts`` prompts of ``--input-len`` random tokens through ``LLM`` (a few tokens each,
so the engine captures its decode step for that batch size, capture.py), then replays the captured
step's recorded calls ``--repeats`` times, timing each call, and prints the time per step by kernel
(linear calls by shape and GGML type). The LM head and sampling run outside the captured step and
are not in the table; the step total is the sum of the calls.

    python plugins/cpu/benchmarks/profile_decode_step.py [--num-prompts 64] [--input-len 64] [--threads 2]

Engine settings come from the environment as for ``pagedllm`` (PAGEDLLM_CPU_BF16_GEMM,
PAGEDLLM_CPU_INT8_DOT, ...); ``--dtype`` as for ``pagedllm bench``. Replaying a captured step
rewrites the same KV-cache slots each time: the numbers are the step's, the outputs are discarded.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file or checkpoint (default: the default model)")
    parser.add_argument("--num-prompts", type=int, default=64, help="sequences in the decode step (<= 64: captured)")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype) or bfloat16")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from pagedllm import LLM
    from pagedllm_cpu.kernels.clib import AMX_FORMATS
    from pagedllm.bench.throughput import run_engine, synthetic_prompts

    llm = LLM(model=args.model, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype)
    prompts = synthetic_prompts(args.num_prompts, args.input_len, llm.llm_engine.tokenizer_info.vocab_size, 0)
    run_engine(llm, prompts, 8, warmup=False)
    graphs = llm.llm_engine.engine_core.executor.runner.decode_graphs
    size = None if graphs is None else graphs.padded_size(args.num_prompts)
    if size is None:
        raise SystemExit(
            f"no captured decode step for {args.num_prompts} sequences (the CPU platform captures up to 64; "
            "PAGEDLLM_CPU_CAPTURE and the log say why a size runs eagerly)"
        )
    step = graphs.captured[size]
    seconds: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()
    for _ in range(args.repeats):
        for name, fn, call_args in step.steps:
            start = time.perf_counter()
            fn(*call_args)
            elapsed = time.perf_counter() - start
            key = name or f"torch: {getattr(fn, '__qualname__', fn)}"
            if name in ("pagedllm_gguf_linear", "pagedllm_gguf_linear_int8", "pagedllm_gguf_linear_amx"):
                qtype, _, m, k, _, n = call_args[:6]
                key = f"{name} {m}x{k} -> {n} (GGML type {qtype})"
            elif name == "pagedllm_amx_linear_tiles":  # kept tiles (PAGEDLLM_CPU_AMX_TILES)
                _, m, k, _, fmt, n = call_args[:6]
                key = f"{name} {m}x{k} -> {n} ({AMX_FORMATS.get(fmt, fmt)} tiles)"
            seconds[key] += elapsed
            calls[key] += 1
    total = sum(seconds.values())
    print(f"\ncaptured decode step of {size} sequences ({len(step.steps)} calls): {1000 * total / args.repeats:.1f} ms")
    for key, spent in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"{1000 * spent / args.repeats:8.2f} ms {100 * spent / total:5.1f}%  x{calls[key] // args.repeats:<3d} {key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
