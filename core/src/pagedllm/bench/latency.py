"""Offline single-stream latency: one request at a time through LLM.generate, optionally beside HF transformers.

`pagedllm bench latency --input-len 32 --output-len 128 --hf` reports the end-to-end latency
of one request and its decode speed (output tokens per second), averaged over ``--num-iters``.
"""

from __future__ import annotations

import argparse
import json
import statistics

from pagedllm.bench.throughput import (
    RunResult,
    engine_kwargs,
    load_hf_model,
    resolved_dtype,
    run_engine,
    run_hf,
    synthetic_prompts,
)


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from pagedllm.engine.engine_args import EngineArgs

    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-iters", type=int, default=3)
    parser.add_argument("--dataset-seed", type=int, default=0)
    parser.add_argument("--hf", action="store_true", help="also run HF transformers generate")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output-json", default=None)
    EngineArgs.add_cli_args(parser)  # --dtype auto by default, as `pagedllm serve` runs; --hf gets the dtype it resolves to
    return parser


def _summarize(name: str, runs: list[RunResult]) -> RunResult:
    """The median run by elapsed time, with every iteration's latency kept."""
    runs = sorted(runs, key=lambda r: r.elapsed_s)
    mid = runs[len(runs) // 2]
    mid.name = name
    mid.extra = {
        **mid.extra,
        "latencies_s": [r.elapsed_s for r in runs],
        "mean_latency_s": statistics.fmean(r.elapsed_s for r in runs),
    }
    return mid


def report(results: list[RunResult]) -> str:
    lines = [f"{'engine':<16} {'batch':>5} {'in':>5} {'out':>5} {'latency s':>10} {'tok/s':>8}"]
    for r in results:
        lines.append(
            f"{r.name:<16} {r.num_requests:>5} {r.input_len:>5} {r.output_len:>5} {r.elapsed_s:>10.3f} "
            f"{r.output_tok_s / r.num_requests:>8.1f}"
        )
    if len(results) > 1 and results[1].output_tok_s > 0:
        lines.append(
            f"speedup vs {results[1].name}: {results[0].output_tok_s / results[1].output_tok_s:.2f}x"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    import torch

    from pagedllm.entrypoints.llm import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(**engine_kwargs(args))
    vocab = llm.llm_engine.tokenizer_info.vocab_size
    prompts = synthetic_prompts(args.batch_size, args.input_len, vocab, args.dataset_seed)
    runs = []
    for i in range(args.num_iters):
        runs.append(run_engine(llm, prompts, args.output_len, warmup=(i == 0)))
        llm.llm_engine.engine_core.reset_prefix_cache()  # every iteration computes its prompt
    results = [_summarize("pagedllm", runs)]
    dtype = resolved_dtype(llm)
    if args.hf:
        del llm
        hf = load_hf_model(args.model, dtype)
        hf_runs = []
        for i in range(args.num_iters):
            hf_runs.append(run_hf(hf, prompts, args.output_len, warmup=(i == 0)))
        results.append(_summarize("hf-transformers", hf_runs))
    print(report(results))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump([r.as_dict() for r in results], f, indent=2)
    return 0
