"""Decode throughput with and without structured-output constraints, side by side, at batch 1 and 16.

    python benchmarks/bench_structured_outputs.py                     # default model, xgrammar
    python benchmarks/bench_structured_outputs.py --backend llguidance --output-len 64

For each batch size B: B greedy requests of --output-len new tokens, first free (ignore_eos),
then constrained by a JSON schema (an array of at least 64 {name, age} objects, so no request can
finish early); generated tokens / wall time of the engine loop, after a warm-up that builds the
grammar library's tokenizer view and compiles the schema. Also times the per-step structured
work alone (one batched bitmask fill + the apply_token_bitmask op) for B rows.
Writes benchmarks/bench_structured_outputs.json and benchmarks/BENCHMARKS_structured_outputs.md
(its own file: bench_offline.py rewrites BENCHMARKS.md whole).
"""

from __future__ import annotations

import argparse
import json
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))

SCHEMA = {
    "type": "array",
    "minItems": 64,
    "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
}
PROMPT = "List some people with their name and age as a JSON array:"


def run_batch(engine, batch: int, output_len: int, constrained: bool) -> dict:
    from pagedllm.sample.sampling_params import SamplingParams

    params = SamplingParams(
        temperature=0.0, max_tokens=output_len, ignore_eos=not constrained,
        structured_outputs={"json": SCHEMA} if constrained else None,
    )
    for i in range(batch):
        engine.add_request(f"{'c' if constrained else 'f'}{batch}-{i}-{time.monotonic_ns()}", PROMPT, params)
    tokens, first_token_at = 0, None
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens += sum(len(o.token_ids) for o in out.outputs)
        if first_token_at is None:
            first_token_at = time.perf_counter()
    elapsed = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": elapsed, "tok_per_s": tokens / elapsed}


def step_overhead(engine, batch: int, repeats: int) -> float:
    """Mean ms of one step's structured work for ``batch`` constrained rows: fill + apply."""
    import torch

    from pagedllm.ops import OPS
    from pagedllm.structured.backend import bitmask_width
    from pagedllm.structured.params import StructuredOutputsParams

    manager = engine.engine_core.structured
    compiled = manager.submit(StructuredOutputsParams(json=SCHEMA)).result()
    backend = manager.backend()
    matchers = [backend.matcher(compiled) for _ in range(batch)]
    vocab = manager.vocab_size
    logits = torch.randn(batch, vocab)
    rows = torch.arange(batch)
    t0 = time.perf_counter()
    for _ in range(repeats):
        bitmask = torch.full((batch, bitmask_width(vocab)), -1, dtype=torch.int32)
        backend.fill_bitmask(matchers, bitmask, list(range(batch)))
        OPS.apply_token_bitmask(logits, bitmask, rows)
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--backend", default="xgrammar", choices=["xgrammar", "llguidance"])
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(HERE, "bench_structured_outputs.json"))
    ap.add_argument("--markdown", default=os.path.join(HERE, "BENCHMARKS_structured_outputs.md"))
    ap.add_argument("--note", default="", help="a line for the report, e.g. how loaded the machine was")
    ap.add_argument("--rounds", type=int, default=3, help="alternating free / constrained rounds (best of each)")
    args = ap.parse_args()

    from pagedllm.engine.llm_engine import LLMEngine
    from pagedllm.ops import OPS

    engine = LLMEngine.from_engine_args(model=args.model, structured_outputs_backend=args.backend,
                                        max_num_seqs=max(int(b) for b in args.batches.split(",")))
    run_batch(engine, 1, 4, True)  # warm-up: tokenizer view + schema compile
    run_batch(engine, 1, 4, False)
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        runs = [(run_batch(engine, b, args.output_len, False), run_batch(engine, b, args.output_len, True))
                for _ in range(args.rounds)]
        free = max((f for f, _ in runs), key=lambda r: r["tok_per_s"])
        cons = max((c for _, c in runs), key=lambda r: r["tok_per_s"])
        rows.append({
            "batch": b, "free_tok_per_s": free["tok_per_s"], "constrained_tok_per_s": cons["tok_per_s"],
            "overhead_pct": 100 * (1 - cons["tok_per_s"] / free["tok_per_s"]),
            "structured_step_ms": step_overhead(engine, b, 20),
        })
    result = {
        "backend": args.backend, "apply_token_bitmask": OPS.owner("apply_token_bitmask"),
        "output_len": args.output_len, "load_average_at_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        "# Structured outputs: decode throughput, constrained vs free",
        "",
        f"`python benchmarks/bench_structured_outputs.py --backend {args.backend} --output-len {args.output_len} "
        f"--rounds {args.rounds}`: default model, greedy, {args.output_len} new tokens per request, free and "
        f"constrained alternating for {args.rounds} rounds, best of each; constrained requests follow a JSON "
        f"schema (an array of at least 64 {{name, age}} objects). apply_token_bitmask by `{result['apply_token_bitmask']}`. "
        f"Load average at the end: {result['load_average_at_end']} on {os.cpu_count()} cores.",
        "",
        "| batch | free tok/s | constrained tok/s | cost | fill + apply per step |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['free_tok_per_s']:.1f} | {r['constrained_tok_per_s']:.1f} | "
                     f"{r['overhead_pct']:.1f}% | {r['structured_step_ms']:.2f} ms |")
    if args.note:
        lines += ["", args.note]
    text = "\n".join(lines) + "\n"
    with open(args.markdown, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
