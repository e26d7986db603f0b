"""Served RSS per process: `pagedllm serve` (API server and engine process) and llama-server on one GGUF file.

Starts each server exactly as run_peers.py does at one concurrency (same context, slots and threads),
runs one `pagedllm bench serve` against it, then reads VmRSS / VmHWM / RssAnon / RssFile of every
process in its tree (run_peers.py reports only their sum). Memory is not affected by other load, so
this runs fine on a busy host.

    python benchmarks/peers/served_rss.py FILE.gguf [--cache-dir DIR] [--concurrency 1] [--which both]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_peers  # noqa: E402

FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def process_memory(pid: int) -> dict:
    """FIELDS in MiB and the command line of one process."""
    out: dict = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in FIELDS:
                out[key] = int(line.split()[1]) / 1024
    with open(f"/proc/{pid}/cmdline") as f:
        out["cmd"] = " ".join(f.read().split("\0")[:4])
    return out


def measure(server: run_peers.Server, args: argparse.Namespace) -> dict:
    if server.error:
        return {"error": server.error}
    try:
        bench = run_peers.bench_serve(server.url, args, args.concurrency[0], seed=1001)
        if server.died():
            return {"error": server.died()}
        procs = {str(p): process_memory(p) for p in run_peers.proc_tree(server.proc.pid)}
        return {"bench": bench, "processes": procs, "total": run_peers.memory_mib(server.proc.pid)}
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument(
        "--cache-dir", default=run_peers.DEFAULT_CACHE, help="where build_llama_cpp.sh built llama.cpp"
    )
    p.add_argument("--which", choices=("both", "pagedllm", "llama-server"), default="both")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--prompts-per-slot", type=int, default=1)
    p.add_argument("--start-timeout-s", type=float, default=900)
    p.add_argument("--serve-timeout-s", type=float, default=1800)
    p.add_argument("--memory-limit-gib", type=float, default=None)
    args = p.parse_args()
    args.concurrency = [args.concurrency]  # run_peers' servers size themselves for the largest
    if args.memory_limit_gib is None:
        args.memory_limit_gib = run_peers.default_memory_limit_gib()
    env = dict(
        os.environ,
        PAGEDLLM_CPU_THREADS=str(args.threads),
        OMP_NUM_THREADS=str(args.threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    results = {}
    if args.which in ("both", "pagedllm"):
        results["pagedllm"] = measure(run_peers.pagedllm_server(args.model, args, env), args)
    if args.which in ("both", "llama-server"):
        bin_dir = os.path.join(args.cache_dir, "build", "bin")
        server = run_peers.llama_server(bin_dir, args.model, args, args.concurrency[0])
        results["llama-server"] = measure(server, args)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
