"""Process memory of a GGUF model kept as blocks vs dequantized dense: peak RSS (VmHWM) after load,
after a 512-token prefill and after decoding, with the weights' and KV cache's own bytes.

Each mode runs in a fresh process (peak RSS is per process). Usage:
    python benchmarks/bench_weight_memory.py [--model FILE.gguf] [--max-model-len 2048] [--prompt-tokens 512]
        [--max-tokens 32] [--modes blocks,dense] [--out bench_weight_memory.json]
Compare with llama.cpp on the same file, context and request: ``llama-server -m FILE -c 2048 -np 1``, one
/completion of the same prompt, then VmHWM in /proc/PID/status (its file-mapped weights count in RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _run_one(model: str | None, mode: str, max_model_len: int, prompt_tokens: int, max_tokens: int) -> dict:
    import torch  # noqa: F401  (counted in the baseline)

    baseline = _status_kib("VmHWM")
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.model.loader.packed import resident_weight_bytes
    from pagedllm.sample.sampling_params import SamplingParams

    llm = LLM(
        model,
        dtype="float32",
        max_model_len=max_model_len,
        max_num_seqs=1,
        num_gpu_blocks_override=-(-max_model_len // 16),
        quantized_weights=mode,
    )
    runner = llm.llm_engine.engine_core.executor.runner
    after_load = _status_kib("VmHWM")
    prompt = list(range(1000, 1000 + prompt_tokens))
    llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False
    )
    kept = sum(1 for m in runner.model.modules() if getattr(m, "packed", None) is not None)
    return {
        "mode": mode,
        "model": model or "default (SmolLM2-135M-Instruct Q4_1 GGUF)",
        "max_model_len": max_model_len,
        "prompt_tokens": prompt_tokens,
        "max_tokens": max_tokens,
        "layers_with_blocks": kept,
        "weights_mib": resident_weight_bytes(runner.model) / 2**20,
        "kv_cache_mib": sum(c.numel() * c.element_size() for c in runner.kv_caches) / 2**20,
        "baseline_peak_rss_mib": baseline / 1024,  # python + torch imported
        "peak_rss_after_load_mib": after_load / 1024,
        "peak_rss_mib": _status_kib("VmHWM") / 1024,
        "rss_mib": _status_kib("VmRSS") / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--modes", default="blocks,dense")
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one mode
    args = p.parse_args()
    if args.one:
        print(
            json.dumps(
                _run_one(args.model, args.one, args.max_model_len, args.prompt_tokens, args.max_tokens)
            )
        )
        return
    results = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--one", mode, "--max-model-len", str(args.max_model_len)]
        cmd += ["--prompt-tokens", str(args.prompt_tokens), "--max-tokens", str(args.max_tokens)]
        if args.model:
            cmd += ["--model", args.model]
        env = dict(os.environ, PAGEDLLM_NO_PROGRESS="1")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
