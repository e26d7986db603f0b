"""Decode speed with and without one CPU-bound neighbour process, side by side in one run.

    python benchmarks/bench_contention.py            # default model (SmolLM2-135M GGUF), fp32

For each thread setting (the default, which adapts to contention; the old fixed one thread per
physical core; and PAGEDLLM_CPU_THREADS=1) a child process loads the model once and alternates
rounds quiet and beside a hog (`while True: pass` in another process, unpinned) and reports the
median of each:
  * single stream: one prompt of --input-len tokens, --output-len new tokens, output tok/s;
  * concurrency 16: 16 such prompts at once (offline, one engine), output tok/s.
The hog ratio (hog / quiet) is the figure issue 20 asks to keep >= 0.45 on a 2-core machine.
Writes its section of benchmarks/BENCHMARKS.md (between the contention markers, the rest kept).
A machine that is already busy makes every figure noisy: the load average is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as pyplatform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN = "<!-- contention benchmark (bench_contention.py): begin -->"
END = "<!-- contention benchmark: end -->"
HOG = "while True: pass"


def worker(args: argparse.Namespace) -> None:
    """One thread setting (from the environment): alternate quiet and hog rounds, print JSON."""
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sample.sampling_params import SamplingParams

    llm = LLM(args.model, max_num_seqs=16) if args.model else LLM(max_num_seqs=16)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    prompts = [[100 + i + j for j in range(args.input_len)] for i in range(16)]
    core = llm.llm_engine.engine_core

    def tok_s(n: int) -> float:
        core.reset_prefix_cache()
        start = time.perf_counter()
        llm.generate(prompts[:n], params, use_tqdm=False)
        return n * args.output_len / (time.perf_counter() - start)

    def settle() -> None:
        # Let the thread count follow the new conditions: a few steps over more than two windows.
        end = time.monotonic() + args.settle_s
        while time.monotonic() < end:
            llm.generate(
                prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False
            )
            time.sleep(0.1)

    tok_s(1), tok_s(16)  # warm-up: kernels built, decode sizes captured
    results: dict[str, dict[str, list[float]]] = {c: {"single": [], "c16": []} for c in ("quiet", "hog")}
    for _ in range(args.rounds):
        for condition in ("quiet", "hog"):
            hog = subprocess.Popen([sys.executable, "-c", HOG]) if condition == "hog" else None
            try:
                settle()
                results[condition]["single"].append(tok_s(1))
                results[condition]["c16"].append(tok_s(16))
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
    platform = llm.llm_engine.engine_core.executor.runner.platform
    print(
        json.dumps(
            {
                "median": {c: {k: statistics.median(v) for k, v in r.items()} for c, r in results.items()},
                "all": results,
                "threads at end": platform.describe().get("contention", ""),
            }
        )
    )


SETTINGS = [
    ("default (adapts to contention)", {}),
    ("fixed: one thread per physical core (the old default)", {"PAGEDLLM_CPU_THREADS": "{cores}"}),
    ("PAGEDLLM_CPU_THREADS=1", {"PAGEDLLM_CPU_THREADS": "1"}),
]


def physical_cores() -> int:
    from pagedllm_cpu.platform import cpu_info

    return cpu_info().physical_cores


def write_section(path: str, text: str) -> None:
    old = open(path).read() if os.path.exists(path) else ""
    block = f"{BEGIN}\n{text}\n{END}\n"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + block + old[old.index(END) + len(END) + 1 :]
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + "\n" + block
    with open(path, "w") as f:
        f.write(new)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="alternating quiet / hog rounds (median reported)")
    p.add_argument(
        "--settle-s", type=float, default=1.5, help="seconds of small steps after the hog starts or stops"
    )
    p.add_argument("--only-default", action="store_true", help="time the default setting only")
    p.add_argument("--note", default="", help="a line recorded with the figures (e.g. what else ran)")
    p.add_argument("--out", default=os.path.join(HERE, "BENCHMARKS.md"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0

    cores = physical_cores()
    load_start = os.getloadavg()
    rows = []
    for name, env in SETTINGS[:1] if args.only_default else SETTINGS:
        child_env = dict(os.environ, **{k: v.format(cores=cores) for k, v in env.items()})
        if not env:
            child_env.pop("PAGEDLLM_CPU_THREADS", None)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--rounds", str(args.rounds)]
        cmd += [
            "--input-len",
            str(args.input_len),
            "--output-len",
            str(args.output_len),
            "--settle-s",
            str(args.settle_s),
        ]
        cmd += ["--model", args.model] if args.model else []
        print(f"== {name}", file=sys.stderr)
        out = subprocess.run(cmd, env=child_env, capture_output=True, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        m = result["median"]
        rows.append(
            f"| {name} | {m['quiet']['single']:.1f} | {m['hog']['single']:.1f} | "
            f"{m['hog']['single'] / m['quiet']['single']:.2f}x | {m['quiet']['c16']:.1f} | {m['hog']['c16']:.1f} | "
            f"{m['hog']['c16'] / m['quiet']['c16']:.2f}x |"
        )
        print(rows[-1], file=sys.stderr)
    load_end = os.getloadavg()
    lines = [
        "# Decode beside a CPU-bound neighbour",
        "",
        f"Reproduce: `python benchmarks/bench_contention.py --rounds {args.rounds}`. Output tok/s "
        f"(median of {args.rounds} alternating rounds), one prompt of {args.input_len} tokens or 16 at once, "
        f'{args.output_len} new tokens each; "hog" = one `{HOG}` process beside the engine. Target: hog '
        "ratio >= 0.45 with the default setting.",
        "",
        f"- cpu: {pyplatform.processor() or pyplatform.machine()}, {cores} physical cores for this process",
        f"- load average at start / end: {' '.join(f'{x:.2f}' for x in load_start)} / "
        f"{' '.join(f'{x:.2f}' for x in load_end)}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
    ]
    if args.note:
        lines.append(f"- note: {args.note}")
    lines += [
        "",
        "| threads | single quiet | single hog | ratio | c16 quiet | c16 hog | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    write_section(args.out, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
