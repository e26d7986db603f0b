"""Offline throughput: a batch of synthetic prompts through LLM.generate, optionally beside HF transformers.

`pagedllm bench throughput --num-prompts 64 --input-len 32 --output-len 64 --hf` generates
``output_len`` tokens (ignore_eos) for each prompt and reports generated tokens per second,
the engine's per-step overhead (time outside the model forward and sampling), and, with
``--hf``, the same batch through ``transformers`` ``generate`` on the same weights and dtype.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

# A 2-core machine: default to the cores we have, the same for both sides.
_THREADS_HELP = "torch intra-op threads for both engines (default: torch's default)"


@dataclass(slots=True)
class RunResult:
    name: str
    num_requests: int
    input_len: int
    output_len: int
    elapsed_s: float
    generated_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def output_tok_s(self) -> float:
        return self.generated_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output_tok_s"] = self.output_tok_s
        return d


def synthetic_prompts(num: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random token ids (like vLLM's random dataset), avoiding the lowest ids where special tokens live."""
    rng = random.Random(seed)
    low = min(100, vocab_size // 2)
    return [[rng.randrange(low, vocab_size) for _ in range(input_len)] for _ in range(num)]


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from pagedllm.engine.engine_args import EngineArgs

    return dict(vars(EngineArgs.from_cli_args(args)))


def run_engine(
    llm: Any, prompts: list[list[int]], output_len: int, warmup: bool = True, name: str = "pagedllm"
) -> RunResult:
    """Greedy, ignore_eos: every request produces exactly output_len tokens."""
    from pagedllm.sample.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    if warmup:
        # The same run once, untimed (as vLLM's latency benchmark warms up): one-time work for its
        # shapes (a backend's per-shape kernel choices, decode steps captured on first use at every
        # batch size the schedule passes through) is not timed; run_hf warms transformers up the same way.
        llm.generate(prompts, params, use_tqdm=False)
    core = llm.llm_engine.engine_core
    # Every run computes its prompts: repeated runs (rounds, latency repeats) and the warm-up would
    # otherwise find them in the prefix cache, which the side it is compared with does not have.
    if not core.reset_prefix_cache():
        raise RuntimeError("could not reset the prefix cache before the run: blocks are still in use")
    before = core.stats()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    after = core.stats()
    step_s = after.step_time_s - before.step_time_s
    model_s = after.model_time_s - before.model_time_s
    steps = after.num_steps - before.num_steps
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return RunResult(
        name=name,
        num_requests=len(prompts),
        input_len=len(prompts[0]),
        output_len=output_len,
        elapsed_s=elapsed,
        generated_tokens=generated,
        extra={
            "num_steps": steps,
            "step_time_s": step_s,
            "model_time_s": model_s,
            "overhead_per_step_ms": 1000 * (step_s - model_s) / max(steps, 1),
            "overhead_fraction": (step_s - model_s) / step_s if step_s > 0 else 0.0,
            # Time in LLM.generate outside EngineCore.step (detokenization, output assembly).
            "frontend_fraction": (elapsed - step_s) / elapsed if elapsed > 0 else 0.0,
            "num_preemptions": after.num_preemptions - before.num_preemptions,
        },
    )


def resolved_dtype(llm: Any) -> str:
    """The dtype the engine runs (``--dtype auto`` resolved by the platform): transformers gets the same."""
    from pagedllm.config import dtype_name

    return dtype_name(llm.llm_engine.config.model.dtype) or "float32"


def load_hf_model(model: str | None, dtype: str) -> Any:
    """The same checkpoint through transformers (GGUF files are dequantized by transformers itself)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pagedllm.config import parse_dtype
    from pagedllm.errors import ConfigError
    from pagedllm.model.loader.source import resolve_source

    source = resolve_source(model)
    torch_dtype = parse_dtype(dtype) or torch.float32
    if source.kind == "gguf" and importlib.util.find_spec("accelerate") is None:
        raise ConfigError(
            "comparing with HF transformers on a GGUF file needs the accelerate package (transformers "
            "loads GGUF only with it): pip install accelerate, or pip install 'pagedllm[bench]'"
        )
    if source.kind == "gguf":
        m = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(source.path), gguf_file=os.path.basename(source.path), dtype=torch_dtype
        )
    else:
        m = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype)
    return m.eval()


def run_hf(hf_model: Any, prompts: list[list[int]], output_len: int, warmup: bool = True) -> RunResult:
    """One batched ``generate`` call; equal-length prompts, so no padding; EOS suppressed by min_new_tokens."""
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0)
    with torch.inference_mode():
        if warmup:  # as run_engine: the same run once, untimed
            hf_model.generate(ids, attention_mask=mask, **kw)
        t0 = time.perf_counter()
        out = hf_model.generate(ids, attention_mask=mask, **kw)
        elapsed = time.perf_counter() - t0
    generated = int(out.shape[0] * (out.shape[1] - ids.shape[1]))
    return RunResult("hf-transformers", len(prompts), ids.shape[1], output_len, elapsed, generated)


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from pagedllm.engine.engine_args import EngineArgs

    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--dataset-seed", type=int, default=0)
    parser.add_argument(
        "--hf", action="store_true", help="also run HF transformers generate on the same batch"
    )
    parser.add_argument("--threads", type=int, default=None, help=_THREADS_HELP)
    parser.add_argument("--output-json", default=None, help="write the results here")
    EngineArgs.add_cli_args(parser)  # --dtype auto by default, as `pagedllm serve` runs; --hf gets the dtype it resolves to
    return parser


def report(results: list[RunResult]) -> str:
    lines = [f"{'engine':<16} {'requests':>8} {'in':>5} {'out':>5} {'seconds':>8} {'out tok/s':>10}"]
    for r in results:
        lines.append(
            f"{r.name:<16} {r.num_requests:>8} {r.input_len:>5} {r.output_len:>5} {r.elapsed_s:>8.2f} "
            f"{r.output_tok_s:>10.1f}"
        )
    eng = results[0]
    if "overhead_fraction" in eng.extra:
        lines.append(
            f"engine overhead: {eng.extra['overhead_per_step_ms']:.2f} ms/step "
            f"({100 * eng.extra['overhead_fraction']:.1f}% of step time, {eng.extra['num_steps']} steps)"
        )
    if len(results) > 1 and results[1].output_tok_s > 0:
        lines.append(f"speedup vs {results[1].name}: {eng.output_tok_s / results[1].output_tok_s:.2f}x")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    import torch

    from pagedllm.entrypoints.llm import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(**engine_kwargs(args))
    vocab = llm.llm_engine.tokenizer_info.vocab_size
    prompts = synthetic_prompts(args.num_prompts, args.input_len, vocab, args.dataset_seed)
    results = [run_engine(llm, prompts, args.output_len)]
    dtype = resolved_dtype(llm)
    if args.hf:
        del llm
        results.append(run_hf(load_hf_model(args.model, dtype), prompts, args.output_len))
    print(report(results))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump([r.as_dict() for r in results], f, indent=2)
    return 0
