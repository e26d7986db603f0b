"""Sampler micro-benchmark: time per decode step for common parameter mixes (``python -m pagedllm.sample.benchmark``)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pagedllm.sample.sampler import Sampler, SamplingMetadata
from pagedllm.sample.sampling_params import SamplingParams

CASES: dict[str, SamplingParams] = {
    "greedy": SamplingParams(temperature=0.0),
    "temperature": SamplingParams(temperature=0.8),
    "temperature+top_p": SamplingParams(temperature=0.8, top_p=0.95),
    "temperature+top_k": SamplingParams(temperature=0.8, top_k=50),
    "temperature+top_k+top_p": SamplingParams(temperature=0.8, top_k=50, top_p=0.95),
    "temperature+min_p": SamplingParams(temperature=0.8, min_p=0.05),
    "penalties": SamplingParams(
        temperature=0.8, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5
    ),
    "greedy+logprobs5": SamplingParams(temperature=0.0, logprobs=5),
    "seeded+top_p": SamplingParams(temperature=0.8, top_p=0.95, seed=0),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(
    case: str,
    batch: int,
    vocab: int,
    output_len: int,
    device: torch.device,
    iters: int,
    logits: torch.Tensor | None = None,
) -> tuple[float, float, float]:
    """Milliseconds: median of SamplingMetadata.from_requests, median and minimum of Sampler.__call__.

    The minimum is the figure to trust on a shared, busy machine.
    """
    if logits is None:
        g = torch.Generator(device=device).manual_seed(0)
        # A few strong candidates over a long, flat tail (a hard case for top-p).
        logits = torch.randn(batch, vocab, generator=g, device=device) * 2.0
        logits[:, :16] += 8.0
    else:
        logits = logits.to(device).float()
        batch, vocab = logits.shape
    params = [CASES[case]] * batch
    prompts = [list(range(100, 400))] * batch
    outputs = [list(range(1000, 1000 + output_len))] * batch
    gens = [
        torch.Generator(device=device).manual_seed(i) if p.seed is not None else None
        for i, p in enumerate(params)
    ]
    sampler = Sampler()
    meta_ms, sample_ms = [], []
    for i in range(iters + 2):
        _sync(device)
        t0 = time.perf_counter()
        meta = SamplingMetadata.from_requests(params, prompts, outputs, gens, vocab, device)
        t1 = time.perf_counter()
        sampler(logits, meta)  # ends with .tolist(), which synchronises
        t2 = time.perf_counter()
        if i >= 2:  # warm-up
            meta_ms.append((t1 - t0) * 1e3)
            sample_ms.append((t2 - t1) * 1e3)
    return statistics.median(meta_ms), statistics.median(sample_ms), min(sample_ms)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--output-len", type=int, default=128, help="output tokens per row (penalty cost)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--logits", help="torch.save'd [batch, vocab] logits to use (e.g. a real model's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    logits = torch.load(args.logits) if args.logits else None
    if logits is not None:
        args.batch, args.vocab = logits.shape
    print(
        f"batch {args.batch} x vocab {args.vocab} on {device} ({torch.get_num_threads()} threads), median of {args.iters}"
    )
    for case in args.cases:
        meta_ms, sample_ms, best_ms = bench(
            case, args.batch, args.vocab, args.output_len, device, args.iters, logits
        )
        print(f"{case:26s} metadata {meta_ms:7.2f} ms   sample {sample_ms:7.2f} ms (min {best_ms:7.2f} ms)")


if __name__ == "__main__":
    main()
