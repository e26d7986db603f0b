"""Offline benchmark, pagedllm beside HF transformers in one run: batch throughput and single-stream decode.

    python benchmarks/bench_offline.py            # default model (SmolLM2-135M GGUF), fp32

Writes benchmarks/BENCHMARKS.md, benchmarks/bench_offline.png and benchmarks/bench_offline.json.
Measures, on the same weights and dtype:
  * batch throughput: --batch prompts of --input-len random tokens, --output-len new tokens each
    (ignore_eos), generated tokens per second; plus the engine's per-step overhead (EngineCore
    step time outside the model forward and sampling) from EngineCoreStats;
  * single-stream decode: one prompt; decode tok/s = (N - 1) / (t(N new tokens) - t(1 new token)),
    i.e. the steady decode rate without the prefill, and the end-to-end latency of N tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as pyplatform
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def machine() -> dict[str, str]:
    import torch
    import transformers

    cpu = pyplatform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError as exc:  # no /proc (not Linux): keep the platform module's description
        cpu = f"{cpu} (/proc/cpuinfo unreadable: {exc.strerror})"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": pyplatform.python_version(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def engine_single_stream(llm, prompt: list[int], new_tokens: int, repeats: int) -> dict[str, float]:
    from pagedllm.sample.sampling_params import SamplingParams

    core = llm.llm_engine.engine_core

    def gen(n: int):
        core.reset_prefix_cache()  # every repeat computes its prompt
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)

    gen(4)
    t1 = median_time(lambda: gen(1), repeats)
    tn = median_time(lambda: gen(new_tokens), repeats)
    return {"ttft_s": t1, "latency_s": tn, "decode_tok_s": (new_tokens - 1) / (tn - t1)}


def hf_single_stream(model, prompt: list[int], new_tokens: int, repeats: int) -> dict[str, float]:
    import torch

    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)

    def gen(n: int):
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0
            )

    gen(4)
    t1 = median_time(lambda: gen(1), repeats)
    tn = median_time(lambda: gen(new_tokens), repeats)
    return {"ttft_s": t1, "latency_s": tn, "decode_tok_s": (new_tokens - 1) / (tn - t1)}


def make_llm(args: argparse.Namespace) -> Any:
    """The engine both measurements use: ``--dtype`` (float32 unless asked), sized for the benchmark's
    batch and lengths."""
    from pagedllm.entrypoints.llm import LLM

    return LLM(
        args.model,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_memory=args.kv_cache_memory,
        platform=args.platform,
        max_num_seqs=max(args.batch, 1),
        max_model_len=args.input_len + max(args.output_len, args.single_new_tokens) + 16,
    )


def ablation(args: argparse.Namespace, prompts: list[list[int]], threads: int) -> dict[str, float]:
    """One round of pagedllm with the CPU backend's C kernels switched off (torch ops, dense weights)."""
    import torch
    from pagedllm.bench.throughput import run_engine
    from pagedllm_cpu.kernels import clib

    os.environ["PAGEDLLM_CPU_KERNELS"] = "0"
    clib.reset()
    try:
        llm = make_llm(args)
        torch.set_num_threads(threads)
        tp = run_engine(llm, prompts, args.output_len, warmup=True)
        single = engine_single_stream(llm, prompts[0], args.single_new_tokens, args.repeats)
    finally:
        del os.environ["PAGEDLLM_CPU_KERNELS"]
        clib.reset()
    print(
        f"  pagedllm without C kernels: batch {tp.output_tok_s:.1f} tok/s, single {single['decode_tok_s']:.1f}"
    )
    return {"throughput_tok_s": tp.output_tok_s, "decode_tok_s": single["decode_tok_s"]}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"batch {results['batch']} x {results['output_len']}\nthroughput (tok/s)",
        "single-stream\ndecode (tok/s)",
    ]
    ours = [results["engine"]["throughput_tok_s"], results["engine"]["single"]["decode_tok_s"]]
    hf = [results["hf"]["throughput_tok_s"], results["hf"]["single"]["decode_tok_s"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(labels))
    w = 0.38
    b1 = ax.bar([x - w / 2 for x in xs], ours, w, label="pagedllm", color="#2a6fdb")
    b2 = ax.bar([x + w / 2 for x in xs], hf, w, label="HF transformers", color="#aaaaaa")
    for bars in (b1, b2):
        for bar in bars:
            ax.annotate(
                f"{bar.get_height():.0f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=9,
            )
    for x, (o, h) in enumerate(zip(ours, hf, strict=True)):
        ax.annotate(f"{o / h:.2f}x", (x, max(o, h) * 1.08), ha="center", fontsize=10, fontweight="bold")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("output tokens / s")
    ax.set_ylim(0, max(ours + hf) * 1.25)
    ax.set_title(f"{results['model']} {arithmetic(results)} on {results['machine']['cores']} CPU cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def arithmetic(results: dict) -> str:
    """pagedllm's side as run: fp32, or the dtype request (``--dtype auto``: bf16 batched steps on AMX hosts)."""
    dtype = results.get("dtype", "float32")
    name = "fp32" if dtype in ("float32", "fp32") else f"--dtype {dtype}"
    kv = results.get("kv_cache_dtype", "auto")
    return name if kv == "auto" else f"{name}, --kv-cache-dtype {kv}"


def write_markdown(results: dict, path: str, command: str) -> None:
    e, h, m = results["engine"], results["hf"], results["machine"]
    speed_tp = e["throughput_tok_s"] / h["throughput_tok_s"]
    speed_ss = e["single"]["decode_tok_s"] / h["single"]["decode_tok_s"]
    lines = [
        "# Offline benchmarks",
        "",
        f"Reproduce: `{command}` (writes this file, `bench_offline.png` and `bench_offline.json`).",
        "",
        f"Model: {results['model']}, pagedllm {arithmetic(results)}, HF transformers fp32, same weights on both "
        "sides (transformers dequantizes the GGUF itself).",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in m.items()],
        "",
        "## Results",
        "",
        "| measurement | pagedllm | HF transformers | speedup |",
        "|---|---:|---:|---:|",
        f"| batch {results['batch']} x {results['output_len']} new tokens (prompt {results['input_len']}), "
        f"output tok/s | {e['throughput_tok_s']:.1f} | {h['throughput_tok_s']:.1f} | {speed_tp:.2f}x |",
        f"| single-stream decode tok/s (steady state) | {e['single']['decode_tok_s']:.1f} | "
        f"{h['single']['decode_tok_s']:.1f} | {speed_ss:.2f}x |",
        f"| single-stream latency, {results['single_new_tokens']} new tokens (s) | "
        f"{e['single']['latency_s']:.2f} | {h['single']['latency_s']:.2f} | "
        f"{h['single']['latency_s'] / e['single']['latency_s']:.2f}x |",
        f"| time to first token, prompt {results['input_len']} (s) | {e['single']['ttft_s']:.3f} | "
        f"{h['single']['ttft_s']:.3f} | |",
        *(
            [
                f"| ablation: pagedllm with `PAGEDLLM_CPU_KERNELS=0` (torch ops, dense fp32 weights), batch / "
                f"single tok/s | {e['ablation']['throughput_tok_s']:.1f} / {e['ablation']['decode_tok_s']:.1f} | "
                f"| {e['ablation']['throughput_tok_s'] / h['throughput_tok_s']:.2f}x / "
                f"{e['ablation']['decode_tok_s'] / h['single']['decode_tok_s']:.2f}x |",
            ]
            if "ablation" in e
            else []
        ),
        "",
        "How pagedllm runs this model ("
        + ("CPU backend, fp32 arithmetic throughout" if arithmetic(results) == "fp32" else "CPU backend; its fp32 path")
        + "): the GGUF's Q4_1 / Q8_0 "
        "blocks are multiplied directly by the C kernels for steps of a few tokens (up to 8 with AVX-512, "
        "1 with AVX2: the `c kernels` line above says which; dequantized in registers to exactly the fp32 "
        "weights transformers computes with; a decode step is bound by memory traffic and the blocks are "
        "5-8.5 bits per weight instead of 32), an fp32 GEMM (AVX-512 or AVX2) on "
        "the dense weights pre-packed into column panels for larger steps, paged attention and the small "
        "ops in C, and decode steps of up to "
        "64 sequences replayed from a capture. Greedy outputs match transformers token for token (tests)."
        + (
            ""
            if arithmetic(results) == "fp32"
            else f" This run asked for {arithmetic(results)}: on AMX hosts its steps of 16+ token rows multiply in "
            "bf16 on AMX tiles (README, \"CPU bf16 matmuls (AMX)\"; `cpu switches` above lists any switch set)."
        ),
        "",
        f"Engine overhead at batch {results['batch']}: {e['overhead_per_step_ms']:.2f} ms per step, "
        f"{100 * e['overhead_fraction']:.1f}% of EngineCore step time ({e['num_steps']} steps; overhead = "
        "scheduling, input preparation and bookkeeping, i.e. step time outside the model forward and sampling). "
        f"Frontend (detokenization, outputs) took {100 * e['frontend_fraction']:.1f}% of wall time.",
        "",
        "![benchmark](bench_offline.png)",
        "",
        f"Each side ran {results['rounds']} alternating rounds; the table shows each side's best round "
        f"(pagedllm rounds: {', '.join(f'{x:.1f}' for x in e['rounds_throughput_tok_s'])} tok/s batched, "
        f"{', '.join(f'{x:.1f}' for x in e['rounds_decode_tok_s'])} tok/s single; HF rounds: "
        f"{', '.join(f'{x:.1f}' for x in h['rounds_throughput_tok_s'])} tok/s batched, "
        f"{', '.join(f'{x:.1f}' for x in h['rounds_decode_tok_s'])} tok/s single; batched ratio round by "
        f"round: {', '.join(f'{a / b:.2f}x' for a, b in zip(e['rounds_throughput_tok_s'], h['rounds_throughput_tok_s'], strict=True))}). "
        "Every timed pagedllm run starts from an empty prefix cache, so it computes its prompts as HF does. "
        "The machine may be shared: the load averages above say how quiet it was; on a busy 2-core machine "
        "re-run when idle.",
        "",
    ]
    # Sections written by other benchmarks (online serving) follow ONLINE_MARKER; keep them.
    kept = ""
    if os.path.exists(path):
        old = open(path).read()
        if ONLINE_MARKER in old:
            kept = old[old.index(ONLINE_MARKER) :]
    with open(path, "w") as f:
        f.write("\n".join(lines) + ("\n" + kept if kept else ""))


ONLINE_MARKER = "<!-- online serving figures: kept when this file is rewritten -->"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--single-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="single-stream repeats per round (median)")
    p.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds; each side's best round is reported"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads for both sides (default: torch's)"
    )
    p.add_argument(
        "--ablation",
        action="store_true",
        help="also run pagedllm once with PAGEDLLM_CPU_KERNELS=0 (CPU backend on torch ops only)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        help="pagedllm's --kv-cache-dtype (default auto: the model's dtype; bfloat16 halves an fp32 cache's traffic)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        help="pagedllm's --dtype (default float32: exact fp32 arithmetic; auto: what `pagedllm serve` runs, "
        "e.g. bf16 batched steps on AMX hosts); HF transformers always runs fp32",
    )
    p.add_argument("--kv-cache-memory", default="1GiB")
    p.add_argument("--platform", default=None)
    p.add_argument("--out-dir", default=HERE)
    args = p.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PAGEDLLM_NO_PROGRESS", "1")
    import torch
    from pagedllm.bench.throughput import load_hf_model, run_engine, run_hf, synthetic_prompts

    if args.threads:
        os.environ["PAGEDLLM_CPU_THREADS"] = str(
            args.threads
        )  # the CPU platform sets torch's threads from it
        torch.set_num_threads(args.threads)
    info = machine()
    llm = make_llm(args)
    threads = torch.get_num_threads()  # what the engine's platform settled on; HF gets the same
    info["torch threads"] = f"{threads} (both sides)"
    facts = llm.llm_engine.engine_core.executor.runner.platform.describe()
    for key in ("attention", "c kernels", "decode capture"):
        if key in facts:
            info[f"pagedllm {key}"] = facts[key]
    model_name = llm.llm_engine.tokenizer_info.model_name
    vocab = llm.llm_engine.tokenizer_info.vocab_size
    prompts = synthetic_prompts(args.batch, args.input_len, vocab, seed=0)

    torch.set_num_threads(threads)
    print("HF transformers: loading ...", flush=True)
    hf_model = load_hf_model(args.model, "float32")

    # Alternate the two sides round by round and keep each side's best round: on a shared
    # machine, load that comes and goes then hits both sides alike.
    engine_tp, hf_tp, engine_ss, hf_ss = [], [], [], []
    for r in range(args.rounds):
        torch.set_num_threads(threads)
        print(f"round {r + 1}/{args.rounds}", flush=True)
        engine_tp.append(run_engine(llm, prompts, args.output_len, warmup=(r == 0)))
        print(f"  pagedllm batch {args.batch}: {engine_tp[-1].output_tok_s:.1f} tok/s", flush=True)
        hf_tp.append(run_hf(hf_model, prompts, args.output_len, warmup=(r == 0)))
        print(f"  HF       batch {args.batch}: {hf_tp[-1].output_tok_s:.1f} tok/s", flush=True)
        engine_ss.append(engine_single_stream(llm, prompts[0], args.single_new_tokens, args.repeats))
        print(f"  pagedllm single-stream decode: {engine_ss[-1]['decode_tok_s']:.1f} tok/s", flush=True)
        hf_ss.append(hf_single_stream(hf_model, prompts[0], args.single_new_tokens, args.repeats))
        print(f"  HF       single-stream decode: {hf_ss[-1]['decode_tok_s']:.1f} tok/s", flush=True)
    tp = max(engine_tp, key=lambda x: x.output_tok_s)
    best_hf_tp = max(hf_tp, key=lambda x: x.output_tok_s)
    engine = {
        "throughput_tok_s": tp.output_tok_s,
        "elapsed_s": tp.elapsed_s,
        **tp.extra,
        "single": max(engine_ss, key=lambda x: x["decode_tok_s"]),
        "rounds_throughput_tok_s": [x.output_tok_s for x in engine_tp],
        "rounds_decode_tok_s": [x["decode_tok_s"] for x in engine_ss],
    }
    hf = {
        "throughput_tok_s": best_hf_tp.output_tok_s,
        "elapsed_s": best_hf_tp.elapsed_s,
        "single": max(hf_ss, key=lambda x: x["decode_tok_s"]),
        "rounds_throughput_tok_s": [x.output_tok_s for x in hf_tp],
        "rounds_decode_tok_s": [x["decode_tok_s"] for x in hf_ss],
    }
    if args.ablation:
        engine["ablation"] = ablation(args, prompts, threads)
    switches = {k: v for k, v in sorted(os.environ.items()) if k.startswith("PAGEDLLM_CPU_") and k != "PAGEDLLM_CPU_THREADS"}
    if switches:
        info["cpu switches"] = ", ".join(f"{k}={v}" for k, v in switches.items())
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

    results = {
        "model": model_name,
        "batch": args.batch,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "single_new_tokens": args.single_new_tokens,
        "machine": info,
        "engine": engine,
        "rounds": args.rounds,
        "dtype": args.dtype,
        "kv_cache_dtype": args.kv_cache_dtype,
        "hf": hf,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "bench_offline.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(results, os.path.join(args.out_dir, "bench_offline.png"))
    command = "python benchmarks/bench_offline.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    write_markdown(results, os.path.join(args.out_dir, "BENCHMARKS.md"), command)
    print(open(os.path.join(args.out_dir, "BENCHMARKS.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
