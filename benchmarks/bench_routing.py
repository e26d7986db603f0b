"""Round-robin vs least-load vs KV-aware routing over 2 `pagedllm serve` replicas behind `pagedllm router`.

For each workload and policy, two fresh replicas (empty caches, KV events on, one CPU thread each so
the machine's cores are split between them) and a router start; `pagedllm bench serve` drives the
workload through the router; the replicas' own prefix-cache counters give the hit rate.

Reproduce: `python benchmarks/bench_routing.py` (writes bench_routing.json, bench_routing.png and the
routing section of BENCHMARKS.md). The default workload is sized so that the prefixes together
exceed one replica's KV cache but fit in both: the case routing by cached prefix exists for.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
POLICIES = ("round_robin", "least_load", "kv_aware")
START = "<!-- routing benchmark: start -->"
END = "<!-- routing benchmark: end -->"
ONLINE_MARKER = "<!-- online serving figures: kept when this file is rewritten -->"


def free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            if s.getsockname()[1] not in ports:
                ports.append(s.getsockname()[1])
    return ports


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            status = httpx.get(f"{url}/health", timeout=2).status_code
            if status == 200:
                return
            last = f"HTTP {status}"
        except httpx.HTTPError as exc:  # not listening yet
            last = repr(exc)
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy in {timeout_s} s (last: {last})")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def metric(url: str, name: str) -> float:
    """A counter's value; 0 before its first increment (labelled series appear only then)."""
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def run_one(args: argparse.Namespace, workload: str, policy: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads_per_replica), TOKENIZERS_PARALLELISM="false",
               PAGEDLLM_CPU_THREADS=str(args.threads_per_replica),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    procs: list[subprocess.Popen] = []
    try:
        replicas = []
        for _ in range(2):
            port, ev, snap = free_ports(3)
            cfg = {"enable_kv_cache_events": True, "endpoint": f"tcp://127.0.0.1:{ev}",
                   "snapshot_endpoint": f"tcp://127.0.0.1:{snap}"}
            cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--port", str(port),
                   "--uvicorn-log-level", "warning", "--served-model-name", "bench",
                   "--num-gpu-blocks-override", str(args.blocks_per_replica), "--max-model-len", "2048",
                   "--kv-events-config", json.dumps(cfg), *args.serve_args]
            procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL))
            replicas.append((f"http://127.0.0.1:{port}", ev, snap))
        for (url, _, _), proc in zip(replicas, procs):
            wait_healthy(url, proc)
        (rport,) = free_ports(1)
        router_url = f"http://127.0.0.1:{rport}"
        cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "router", "--port", str(rport), "--policy", policy,
               "--health-interval", "1"]
        for url, ev, snap in replicas:
            cmd += ["--replica", f"{url},events=tcp://127.0.0.1:{ev},snapshot=tcp://127.0.0.1:{snap}"]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL))
        wait_healthy(router_url, procs[-1])
        before = [(metric(u, "pagedllm:prefix_cache_hits_total"), metric(u, "pagedllm:prefix_cache_queries_total"))
                  for u, _, _ in replicas]
        from pagedllm.bench import serve as bench

        bargs = bench.add_cli_args(argparse.ArgumentParser()).parse_args([
            "--base-url", router_url, "--model", "bench", "--endpoint", args.endpoint, "--workload", workload,
            "--num-prompts", str(args.num_prompts if workload == "shared-prefix" else args.num_conversations),
            "--num-prefixes", str(args.num_prefixes), "--prefix-len", str(args.prefix_len),
            "--num-turns", str(args.num_turns), "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--max-concurrency", str(args.max_concurrency),
            "--seed", str(args.seed)])
        import asyncio

        summary, results = asyncio.run(bench.run(bargs))
        after = [(metric(u, "pagedllm:prefix_cache_hits_total"), metric(u, "pagedllm:prefix_cache_queries_total"))
                 for u, _, _ in replicas]
        hits = sum(a[0] - b[0] for a, b in zip(after, before))
        queries = sum(a[1] - b[1] for a, b in zip(after, before))
        per_replica = {u: sum(1 for r in results if r.replica == u) for u, _, _ in replicas}
        return {"workload": workload, "policy": policy, "hit_rate": hits / queries if queries else 0.0,
                "hit_tokens": hits, "query_tokens": queries, "ttft_p50_ms": summary["ttft_ms"]["median"],
                "ttft_p99_ms": summary["ttft_ms"]["p99"], "request_throughput": summary["request_throughput"],
                "output_throughput": summary["output_throughput"], "completed": summary["completed"],
                "failed": summary["failed"], "requests_per_replica": list(per_replica.values())}
    finally:
        for proc in reversed(procs):
            stop(proc)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({r["workload"] for r in rows})
    metrics = [("hit_rate", "prefix-cache hit rate"), ("ttft_p50_ms", "TTFT p50 (ms)"),
               ("ttft_p99_ms", "TTFT p99 (ms)"), ("request_throughput", "requests/s")]
    fig, axes = plt.subplots(len(workloads), len(metrics), figsize=(16, 3.6 * len(workloads)), squeeze=False)
    for i, w in enumerate(workloads):
        sub = [r for r in rows if r["workload"] == w]
        for j, (key, title) in enumerate(metrics):
            ax = axes[i][j]
            ax.bar([r["policy"] for r in sub], [r[key] for r in sub], color=["#999", "#69c", "#c63"][: len(sub)])
            ax.set_title(f"{w}: {title}", fontsize=9)
            ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_markdown(rows: list[dict], args: argparse.Namespace, path: str, load: tuple, load_end: tuple) -> None:
    lines = [START, "## Routing across 2 replicas (`pagedllm router`)", "",
             "Reproduce: `python benchmarks/bench_routing.py` (writes bench_routing.json, bench_routing.png and "
             "this section).", "",
             f"**Measured on a contended machine** (2 shared cores, other jobs running; load average "
             f"{load[0]:.2f} at start, {load_end[0]:.2f} at end): compare the policies with each other, not with "
             "other tables. Each policy ran on two fresh replicas of SmolLM2-135M-Instruct "
             f"({args.threads_per_replica} CPU thread each, {args.blocks_per_replica} KV blocks x 16 tokens each), "
             f"one after another in the same run, the three policies alternating for {args.rounds} round(s) per "
             f"workload (hit rate over all rounds, latency and throughput the median of the rounds). Workloads: shared-prefix = {args.num_prompts} requests over "
             f"{args.num_prefixes} equally popular system prompts of {args.prefix_len} words + {args.input_len}-word questions; "
             f"multi-turn = {args.num_conversations} conversations x {args.num_turns} turns; {args.output_len} "
             f"output tokens each, {args.max_concurrency} requests in flight.", "",
             "| workload | policy | prefix-cache hit rate | vs round-robin | TTFT p50 (ms) | TTFT p99 (ms) | "
             "req/s | output tok/s | requests per replica | failed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        base = next(x for x in rows if x["workload"] == r["workload"] and x["policy"] == "round_robin")
        ratio = r["hit_rate"] / base["hit_rate"] if base["hit_rate"] else float("inf")
        lines.append(f"| {r['workload']} | {r['policy']} | {100 * r['hit_rate']:.1f}% | {ratio:.2f}x | "
                     f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['request_throughput']:.2f} | "
                     f"{r['output_throughput']:.1f} | {' / '.join(map(str, r['requests_per_replica']))} | "
                     f"{r['failed']} |")
    lines += ["", "![routing](bench_routing.png)", "", END]
    section = "\n".join(lines) + "\n"
    old = open(path).read() if os.path.exists(path) else ""
    if START in old:
        new = old[: old.index(START)] + section + old[old.index(END) + len(END) + 1 :]
    elif ONLINE_MARKER in old:
        new = old.rstrip("\n") + "\n\n" + section
    else:
        new = old.rstrip("\n") + "\n\n" + ONLINE_MARKER + "\n\n" + section
    with open(path, "w") as f:
        f.write(new)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=["shared-prefix", "multi-turn"])
    p.add_argument("--policies", nargs="+", default=list(POLICIES))
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--num-prefixes", type=int, default=24)
    p.add_argument("--prefix-len", type=int, default=256)
    p.add_argument("--num-conversations", type=int, default=6)
    p.add_argument("--num-turns", type=int, default=3)
    p.add_argument("--input-len", type=int, default=24)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--max-concurrency", type=int, default=4)
    p.add_argument("--blocks-per-replica", type=int, default=220)
    p.add_argument("--rounds", type=int, default=1, help="rounds per workload; the table shows medians")
    p.add_argument("--threads-per-replica", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="extra `pagedllm serve` flags (last)")
    p.add_argument("--out-dir", default=HERE)
    args = p.parse_args()
    load = os.getloadavg()
    rows, runs = [], []
    for workload in args.workloads:
        # Policies alternate within each round, so a change in the machine's load hits all of them.
        for round_ in range(args.rounds):
            for policy in args.policies:
                run = run_one(args, workload, policy) | {"round": round_}
                print(json.dumps(run), flush=True)
                runs.append(run)
        rows += [combine([r for r in runs if r["workload"] == workload and r["policy"] == p]) for p in args.policies]
        load_end = os.getloadavg()
        with open(os.path.join(args.out_dir, "bench_routing.json"), "w") as f:
            json.dump({"config": vars(args), "load_average": [load, load_end], "results": rows, "runs": runs}, f,
                      indent=2)
        plot(rows, os.path.join(args.out_dir, "bench_routing.png"))
        if "round_robin" in args.policies:
            write_markdown(rows, args, os.path.join(args.out_dir, "BENCHMARKS.md"), load, load_end)
    return 0


def combine(runs: list[dict]) -> dict:
    """One row per policy: token-weighted hit rate, medians of the latency and throughput figures."""
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    hits, queries = sum(r["hit_tokens"] for r in runs), sum(r["query_tokens"] for r in runs)
    return {"workload": runs[0]["workload"], "policy": runs[0]["policy"], "rounds": len(runs),
            "hit_rate": hits / queries if queries else 0.0, "hit_tokens": hits, "query_tokens": queries,
            "ttft_p50_ms": med("ttft_p50_ms"), "ttft_p99_ms": med("ttft_p99_ms"),
            "request_throughput": med("request_throughput"), "output_throughput": med("output_throughput"),
            "completed": sum(r["completed"] for r in runs), "failed": sum(r["failed"] for r in runs),
            "requests_per_replica": [sum(r["requests_per_replica"][i] for r in runs) for i in range(2)]}


if __name__ == "__main__":
    sys.exit(main())
