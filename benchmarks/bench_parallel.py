"""Multi-rank benchmark: throughput at world size 1, tensor parallel 2 and pipeline parallel 2 side by side,
the communication a step costs, the pipeline's bubble, and each rank's memory.

    python benchmarks/bench_parallel.py                      # default model (SmolLM2-135M GGUF), fp32
    python benchmarks/bench_parallel.py --configs tp1 tp2 --batch 32 --output-len 64

Each configuration runs in a fresh process (so peak memory is its own). Reported per configuration:
  * generated tokens per second for --batch prompts of --input-len random tokens, --output-len new
    tokens each (ignore_eos), after one warm-up request;
  * per step: the step time (EngineCore), the executor's broadcast of the step (pickle + ZMQ publish,
    bytes), the driver rank's collectives (all-reduce / all-gather through the platform's communicator,
    synchronized) and their share of the step;
  * PP: how long the last stage waited for activations per step (its idle share: the bubble; steps
    are split into PAGEDLLM_PP_MICROBATCHES micro-batches, default 2, in flight through the stages);
  * per rank: peak resident memory once loaded, its share of the weights and of the KV cache.
All configurations run eagerly (--enforce-eager): ranks of a multi-rank engine do not replay captured
decode steps, so world size 1 does not either, to compare like with like. Writes
benchmarks/bench_parallel.json and benchmarks/bench_parallel.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {
    "tp1": dict(tensor_parallel_size=1),
    "tp2": dict(tensor_parallel_size=2),
    "pp2": dict(pipeline_parallel_size=2),
}
MiB = 1 << 20


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One configuration, in this process: build, warm up, generate, collect the figures."""
    import random

    from pagedllm.engine.engine_args import EngineArgs
    from pagedllm.engine.engine_core import EngineCore
    from pagedllm.engine.input_processor import InputProcessor
    from pagedllm.sample.sampling_params import SamplingParams

    os.environ.setdefault("PAGEDLLM_NO_PROGRESS", "1")
    engine_args = EngineArgs(
        model=args.model,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=args.input_len + args.output_len + 16,
        max_num_seqs=args.batch,
        **CONFIGS[name],
    )
    t0 = time.perf_counter()
    core = EngineCore(engine_args.create_engine_config())
    startup_s = time.perf_counter() - t0
    try:
        proc = InputProcessor(core.config, core.tokenizer_info, core.num_blocks)
        rng = random.Random(0)
        vocab = core.tokenizer_info.vocab_size

        def generate(tag: str, n: int, out_len: int) -> int:
            params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
            for i in range(n):
                prompt = [rng.randrange(100, vocab - 100) for _ in range(args.input_len)]
                core.add_request(proc.process(f"{tag}{i}", prompt, params))
            tokens = 0
            while core.has_unfinished_requests():
                tokens += sum(len(o.new_token_ids) for o in core.step())
            return tokens

        generate("warm", 1, 4)
        ex = core.executor
        before = core.stats()
        b0 = (getattr(ex, "num_steps", 0), getattr(ex, "broadcast_time_s", 0.0), getattr(ex, "broadcast_bytes", 0),
              getattr(ex, "comm_time_s", 0.0), getattr(ex, "pp_wait_time_s", 0.0))
        t0 = time.perf_counter()
        tokens = generate("run", args.batch, args.output_len)
        elapsed = time.perf_counter() - t0
        after = core.stats()
        steps = after.num_steps - before.num_steps
        step_s = (after.step_time_s - before.step_time_s) / steps
        row: dict[str, Any] = {
            "config": name,
            "world_size": core.config.parallel.world_size,
            "executor": type(ex).__name__,
            "startup_s": startup_s,
            "generated_tokens": tokens,
            "elapsed_s": elapsed,
            "tokens_per_s": tokens / elapsed,
            "steps": steps,
            "step_ms": step_s * 1e3,
            "model_ms": (after.model_time_s - before.model_time_s) / steps * 1e3,
        }
        if hasattr(ex, "broadcast_time_s"):
            n = ex.num_steps - b0[0]
            row["broadcast_ms"] = (ex.broadcast_time_s - b0[1]) / n * 1e3
            row["broadcast_bytes"] = (ex.broadcast_bytes - b0[2]) / n
            row["collectives_ms"] = (ex.comm_time_s - b0[3]) / n * 1e3
            row["comm_share"] = (row["broadcast_ms"] + row["collectives_ms"]) / row["step_ms"]
            # PP: the last stage's wait for activations (its idle share of the step: the bubble).
            row["pp_wait_ms"] = (ex.pp_wait_time_s - b0[4]) / n * 1e3
            row["bubble"] = row["pp_wait_ms"] / row["step_ms"]
            row["ranks"] = [
                {"rank": r, "peak_rss_mib": i.peak_rss_bytes / MiB, "weights_mib": i.weight_bytes / MiB,
                 "kv_cache_mib": i.kv_cache_bytes / MiB}
                for r, i in enumerate(ex.rank_info)
            ]
        else:
            runner = ex.runner
            row["ranks"] = [{
                "rank": 0,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB,
                "weights_mib": sum(t.numel() * t.element_size() for t in runner.model.state_dict().values()) / MiB,
                "kv_cache_mib": sum(c.numel() * c.element_size() for c in runner.kv_caches) / MiB,
            }]
        return row
    finally:
        core.shutdown()


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, note: str) -> str:
    lines = [
        "# Multiple devices: TP 1, TP 2, PP 2 (CPU, gloo)",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs. {note}",
        f"Model: {args.model or 'SmolLM2-135M-Instruct (GGUF, dequantized)'}, {args.dtype}, eager; "
        f"batch {args.batch} x {args.input_len} prompt tokens -> {args.output_len} new tokens each.",
        "",
        "| config | executor | tok/s | step ms | model ms | broadcast ms (bytes) | collectives ms | comm share "
        "| last stage waiting (bubble) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | not run: {r['error']} | | | | | | | |")
            continue
        comm = (f"{r['broadcast_ms']:.2f} ({r['broadcast_bytes']:.0f} B) | {r['collectives_ms']:.1f} | "
                f"{100 * r['comm_share']:.0f}% | " + (f"{r['pp_wait_ms']:.1f} ms ({100 * r['bubble']:.0f}%)"
                                                      if r["config"].startswith("pp") else "-")
                if "broadcast_ms" in r else "- | - | - | -")
        lines.append(f"| {r['config']} | {r['executor']} | {r['tokens_per_s']:.1f} | {r['step_ms']:.1f} | "
                     f"{r['model_ms']:.1f} | {comm} |")
    lines += ["", "| config | rank | peak RSS MiB | weights MiB | KV cache MiB |", "|---|---|---|---|---|"]
    for r in rows:
        for k in r.get("ranks", []):
            lines.append(f"| {r['config']} | {k['rank']} | {k['peak_rss_mib']:.0f} | {k['weights_mib']:.0f} | "
                         f"{k['kv_cache_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--note", default="", help="e.g. 'shared machine, load ~6': printed with the results")
    ap.add_argument("--out", default=os.path.join(HERE, "bench_parallel"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return 0
    rows = []
    for name in args.configs:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--dtype", args.dtype,
               "--batch", str(args.batch), "--input-len", str(args.input_len), "--output-len", str(args.output_len)]
        if args.model:
            cmd += ["--model", args.model]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        rows.append(json.loads(found[-1][7:]) if proc.returncode == 0 and found
                    else {"config": name, "error": f"exit code {proc.returncode}"})
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    text = markdown(rows, args, args.note)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
