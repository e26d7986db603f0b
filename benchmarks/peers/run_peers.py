"""pagedllm beside llama.cpp on the same GGUF file, same threads, one run, alternating rounds.

    benchmarks/peers/build_llama_cpp.sh            # once: llama-server, llama-bench, llama-quantize
    python benchmarks/peers/make_checkpoints.py    # optional: 1B / 3B-shape Q4_K_M and Q8_0 files
    python benchmarks/peers/run_peers.py [--rounds 2] [--threads 2] [--note "quiet host"]

For each model (the default SmolLM2-135M Q4_1 GGUF, plus every make_checkpoints.py file found in the
cache dir; or --models FILE...), each round runs both engines, alternating which goes first:
  * offline (pagedllm in a child process that loads the model once, `pagedllm bench`'s run_engine;
    llama.cpp's llama-bench):
      - prefill tok/s at --prefill-tokens (512) prompt tokens: pagedllm 512 / t(prompt, 1 new token),
        llama-bench pp512;
      - single-stream decode tok/s: pagedllm (N - 1) / (t(N new tokens) - t(1 new token)) after an
        --decode-prompt-token prompt, N = --decode-tokens (128), llama-bench tg128 (from an empty
        context);
  * online: `pagedllm bench serve` (streaming completions, ignore_eos, random prompts of --input-len
    tokens cut exactly by each server's /tokenize, --output-len new tokens) against `pagedllm serve` and
    `llama-server --parallel C` (continuous batching, -c C x (input + output + 64) so each slot holds a
    request) at each concurrency C (1, 16, 64), --prompts-per-slot x C prompts (at least 4); each
    round uses new prompts (another seed), so no server reuses a cached prefix from an earlier round;
  * memory: VmRSS and VmHWM of each server after its run (pagedllm: API server + engine process).
Threads: llama.cpp -t/-tb T, pagedllm PAGEDLLM_CPU_THREADS=T (fixed, not adapting to contention).
A file pagedllm cannot load gives a "pagedllm cannot load this file: <reason>" row, llama.cpp's
figures beside it. Writes benchmarks/peers/peers.json, peers.png and the section of
benchmarks/BENCHMARKS.md between the peers markers (the rest of that file kept).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform as pyplatform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH_DIR = os.path.dirname(HERE)
DEFAULT_CACHE = os.environ.get("PAGEDLLM_PEERS_DIR", os.path.expanduser("~/.cache/pagedllm/peers"))
BEGIN = "<!-- peers benchmark (benchmarks/peers/run_peers.py): begin -->"
END = "<!-- peers benchmark: end -->"
SIMD_FLAGS = re.compile(r"^(avx\S*|amx\S*|fma|f16c|sse4_2|vnni\S*|avx512\S*)$")


def log(msg: str) -> None:
    print(f"[run_peers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- host

def host_info(threads: int) -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if _which("lscpu") else ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("Flags", "").split()
    return {
        "cpu": fields.get("Model name", pyplatform.processor() or "unknown"),
        "cpus (lscpu)": fields.get("CPU(s)", str(os.cpu_count())),
        "threads per core": fields.get("Thread(s) per core", "?"),
        "simd flags": " ".join(f for f in flags if SIMD_FLAGS.match(f)) or "(lscpu unavailable)",
        "threads used (both engines)": str(threads),
        "python": pyplatform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _which(name: str) -> bool:
    return any(os.access(os.path.join(d, name), os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM summed over the process tree, MiB."""
    total = {"rss_mib": 0.0, "hwm_mib": 0.0}
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total["rss_mib"] += int(line.split()[1]) / 1024
                    elif line.startswith("VmHWM:"):
                        total["hwm_mib"] += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


class MemoryWatch:
    """Kills a process tree whose RSS passes a limit (a shared host must not be pushed out of memory)."""

    def __init__(self, pid: int, limit_gib: float) -> None:
        import threading

        self.pid, self.limit_mib, self.tripped = pid, limit_gib * 1024, ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            rss = memory_mib(self.pid)["rss_mib"]
            if rss > self.limit_mib:
                self.tripped = (f"stopped at {rss / 1024:.1f} GiB RSS, over the {self.limit_mib / 1024:.1f} GiB "
                                "limit (--memory-limit-gib)")
                for p in proc_tree(self.pid):
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        continue  # exited between listing and kill: nothing left to stop
                return

    def stop(self) -> None:
        self._stop.set()


def default_memory_limit_gib() -> float:
    """80% of the memory available now."""
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return 0.8 * info.get("MemAvailable", info["MemTotal"]) / 2**20


# ----------------------------------------------------------------------------- offline

def pagedllm_offline_worker(args: argparse.Namespace) -> int:
    """Child process: load the model once, then one measurement per line read from stdin."""
    from pagedllm.bench.throughput import run_engine, synthetic_prompts
    from pagedllm.entrypoints.llm import LLM

    llm = LLM(args.model, max_num_seqs=4, max_model_len=args.prefill_tokens + args.decode_tokens + 64)
    vocab = llm.llm_engine.tokenizer_info.vocab_size
    long_prompt = synthetic_prompts(1, args.prefill_tokens, vocab, 1)
    short_prompt = synthetic_prompts(1, args.decode_prompt_tokens, vocab, 2)
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        # untimed: kernels built, decode sizes captured, and the per-shape path choices a backend makes
        # on first sight (the CPU's bf16 routing) made for both prompt lengths, as llama-bench warms up
        run_engine(llm, short_prompt, 4, warmup=True)
        run_engine(llm, long_prompt, 1, warmup=False)
        prefill = min(run_engine(llm, long_prompt, 1, warmup=False).elapsed_s for _ in range(args.repeats))
        t1 = statistics.median(run_engine(llm, short_prompt, 1, warmup=False).elapsed_s for _ in range(args.repeats))
        tn = statistics.median(run_engine(llm, short_prompt, args.decode_tokens, warmup=False).elapsed_s
                               for _ in range(args.repeats))
        print(json.dumps({"prefill_tok_s": args.prefill_tokens / prefill,
                          "decode_tok_s": (args.decode_tokens - 1) / (tn - t1)}), flush=True)
    return 0


class PagedOffline:
    """The offline worker process (None figures and a reason when pagedllm cannot load the file)."""

    def __init__(self, args: argparse.Namespace, model: str, env: dict) -> None:
        self.error = ""
        self.stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, os.path.abspath(__file__), "--offline-worker", "--model-file", model,
               "--prefill-tokens", str(args.prefill_tokens), "--decode-tokens", str(args.decode_tokens),
               "--decode-prompt-tokens", str(args.decode_prompt_tokens), "--repeats", str(args.repeats)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=env)
        self.watch = MemoryWatch(self.proc.pid, args.memory_limit_gib)
        line = self.proc.stdout.readline()
        if not line:
            self.error = self._reason()

    def _reason(self) -> str:
        rc = self.proc.wait()
        if self.watch.tripped:
            return self.watch.tripped
        self.stderr.seek(0)
        lines = [x for x in self.stderr.read().splitlines() if x.strip()]
        if rc < 0:
            cause = f"killed by signal {-rc}" + (" (out of memory?)" if -rc == signal.SIGKILL else "")
            return f"{cause}; last output: {lines[-1][:300] if lines else ''}"
        errors = [x for x in lines if re.match(r"^[\w.]+(Error|Exception)\b", x)]
        return (errors or lines or [f"exit status {rc}"])[-1][:400]

    def measure(self) -> dict:
        if self.error:
            return {"error": self.error}
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.error = self._reason()
            return {"error": self.error}
        return json.loads(line)

    def close(self) -> None:
        self.watch.stop()
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def llama_bench(bin_dir: str, model: str, args: argparse.Namespace) -> dict:
    cmd = [os.path.join(bin_dir, "llama-bench"), "-m", model, "-t", str(args.threads), "-p",
           str(args.prefill_tokens), "-n", str(args.decode_tokens), "-r", str(args.repeats), "-o", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": f"llama-bench failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}"}
    out: dict = {}
    for row in json.loads(r.stdout):
        if row.get("n_prompt") and not row.get("n_gen"):
            out["prefill_tok_s"] = row["avg_ts"]
        elif row.get("n_gen") and not row.get("n_prompt"):
            out["decode_tok_s"] = row["avg_ts"]
    return out


# ----------------------------------------------------------------------------- online

class Server:
    """A server process on a free loopback port, waited for on /health, stopped by SIGTERM."""

    def __init__(self, name: str, cmd: list[str], env: dict, port: int, timeout_s: float,
                 memory_limit_gib: float) -> None:
        self.name, self.port, self.error = name, port, ""
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(mode="w+", prefix=f"{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.watch = MemoryWatch(self.proc.pid, memory_limit_gib)
        import httpx

        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while True:
            if self.proc.poll() is not None:
                self.error = self._reason(f"exited with status {self.proc.returncode}")
                return
            try:
                status = httpx.get(f"{self.url}/health", timeout=2).status_code
                if status == 200:
                    return
                last = f"/health answered {status}"
            except httpx.HTTPError as exc:  # not listening yet
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                self.error = self._reason(f"not healthy after {timeout_s:.0f} s (last: {last})")
                self.stop()
                return
            time.sleep(0.5)

    def _reason(self, what: str) -> str:
        if self.watch.tripped:
            return self.watch.tripped
        self.log.flush()
        with open(self.log.name) as f:
            lines = [x for x in f.read().splitlines() if x.strip()]
        errors = [x for x in lines if re.search(r"(Error|Exception|error:)", x)]
        return f"{what}: {(errors or lines or [''])[-1][:400]}"

    def memory(self) -> dict[str, float] | None:
        return memory_mib(self.proc.pid) if self.proc.poll() is None else None

    def died(self) -> str:
        """Why the server is gone ('' while it runs)."""
        return "" if self.proc.poll() is None else self._reason(f"the server exited with status {self.proc.returncode}")

    def stop(self) -> None:
        self.watch.stop()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def bench_serve(url: str, args: argparse.Namespace, concurrency: int, seed: int) -> dict:
    """`pagedllm bench serve`, unchanged, against one server; its summary."""
    num = max(4, args.prompts_per_slot * concurrency)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "bench", "serve", "--base-url", url,
               "--num-prompts", str(num), "--input-len", str(args.input_len), "--output-len",
               str(args.output_len), "--max-concurrency", str(concurrency), "--seed", str(seed),
               "--result-json", out.name]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.serve_timeout_s)
        if r.returncode != 0:
            out_lines = (r.stderr + "\n" + r.stdout).splitlines()
            why = [x for x in out_lines if x.startswith("errors:") or "Error" in x] or out_lines[-1:]
            return {"error": f"bench serve failed ({r.returncode}): {' '.join(why)[-300:]}"}
        with open(out.name) as f:
            summary = json.load(f)["summary"]
    keep = ("completed", "failed", "output_throughput", "request_throughput", "total_input_tokens",
            "total_output_tokens", "duration_s", "errors")
    return {**{k: summary[k] for k in keep}, "ttft_ms_median": summary["ttft_ms"]["median"],
            "tpot_ms_median": summary["tpot_ms"]["median"]}


def pagedllm_server(model: str, args: argparse.Namespace, env: dict) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", model, "--port", str(port),
           "--max-num-seqs", str(max(args.concurrency)), "--max-model-len",
           str(args.input_len + args.output_len + 64), "--disable-uvicorn-access-log",
           "--uvicorn-log-level", "warning"]
    return Server("pagedllm", cmd, env, port, args.start_timeout_s, args.memory_limit_gib)


def llama_server(bin_dir: str, model: str, args: argparse.Namespace, concurrency: int) -> Server:
    port = free_port()
    ctx = concurrency * (args.input_len + args.output_len + 64)
    cmd = [os.path.join(bin_dir, "llama-server"), "-m", model, "--host", "127.0.0.1", "--port", str(port),
           "-t", str(args.threads), "-tb", str(args.threads), "--parallel", str(concurrency), "-c", str(ctx),
           "--cont-batching", "--no-webui"]
    return Server("llama-server", cmd, dict(os.environ), port, args.start_timeout_s, args.memory_limit_gib)


# ----------------------------------------------------------------------------- one model

def run_model(model: str, args: argparse.Namespace, bin_dir: str) -> dict:
    env = dict(os.environ, PAGEDLLM_CPU_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res: dict = {"model": model, "size_gib": os.path.getsize(model) / 2**30, "pagedllm_error": "",
                 "offline": {"pagedllm": [], "llama.cpp": []}, "serve": {}, "memory": {}}
    log(f"{os.path.basename(model)}: offline")
    paged = PagedOffline(args, model, env)
    res["pagedllm_error"] = paged.error
    if paged.error:
        log(f"pagedllm cannot load this file: {paged.error}")
    try:
        for r in range(args.rounds):
            order = ("pagedllm", "llama.cpp") if r % 2 == 0 else ("llama.cpp", "pagedllm")
            for side in order:
                if side == "pagedllm" and paged.error:
                    continue
                m = paged.measure() if side == "pagedllm" else llama_bench(bin_dir, model, args)
                res["offline"][side].append(m)
                log(f"  round {r + 1} {side}: {m}")
        res["pagedllm_error"] = res["pagedllm_error"] or paged.error
    finally:
        paged.close()
    if args.skip_serve:
        return res
    log(f"{os.path.basename(model)}: serving")
    server = None if res["pagedllm_error"] else pagedllm_server(model, args, env)
    if server is not None and server.error:
        res["pagedllm_error"] = server.error
        log(f"pagedllm cannot serve this file: {server.error}")
        server = None
    try:
        for r in range(args.rounds):
            for c in args.concurrency:
                seed = 1000 * (r + 1) + c
                order = ("pagedllm", "llama.cpp") if r % 2 == 0 else ("llama.cpp", "pagedllm")
                for side in order:
                    if side == "pagedllm":
                        if server is None:
                            continue
                        m = bench_serve(server.url, args, c, seed)
                        if server.died():
                            m = {"error": server.died()}
                            res["pagedllm_error"] = f"the server died while serving: {m['error']}"
                        else:
                            res["memory"]["pagedllm"] = server.memory()
                    else:
                        ls = llama_server(bin_dir, model, args, c)
                        try:
                            m = {"error": ls.error} if ls.error else bench_serve(ls.url, args, c, seed)
                            if ls.died():
                                m = {"error": ls.died()}
                            elif ls.memory():
                                res["memory"][f"llama-server c{c}"] = ls.memory()
                        finally:
                            ls.stop()
                    res["serve"].setdefault(side, {}).setdefault(str(c), []).append(m)
                    log(f"  round {r + 1} c{c} {side}: {m.get('output_throughput', m.get('error'))}")
    finally:
        if server is not None:
            server.stop()
    return res


# ----------------------------------------------------------------------------- report

def best(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if key in r]
    return max(vals) if vals else None


def served_concurrencies(res: dict) -> list[int]:
    return sorted({int(c) for side in res["serve"].values() for c in side})


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


ARITHMETIC_SWITCHES = ("PAGEDLLM_CPU_INT8_DOT", "PAGEDLLM_CPU_BF16_GEMM")


def arithmetic() -> str:
    """pagedllm's arithmetic in this run: ``default`` (both CPU switches unset: what ``--dtype auto``
    picks, int8 activations for decode-sized steps where the CPU has VNNI and bf16 AMX tiles for
    batched ones where it has AMX) or the switches that were set, e.g. ``INT8_DOT=off, BF16_GEMM=off``
    (exact fp32 everywhere)."""
    chosen = [f"{k.removeprefix('PAGEDLLM_CPU_')}={os.environ[k]}" for k in ARITHMETIC_SWITCHES if k in os.environ]
    return ", ".join(chosen) or "default"


def model_rows(res: dict, args: argparse.Namespace, host: dict) -> list[str]:
    name = os.path.basename(res["model"])
    if res.get("arith", "default") != "default":
        name += f" [pagedllm {res['arith']}]"
    if res.get("host", host) != host:  # kept from an earlier run (--append)
        name += f" (run of {res['host']['date']}, load {res['host']['load average at start']})"
    rows = []
    if res["pagedllm_error"]:
        reason = " ".join(res["pagedllm_error"].split()).replace("|", "/")
        rows.append(f"| {name} | pagedllm cannot load this file: {reason} | | | |")
    off = res["offline"]
    for key, label in (("decode_tok_s", f"single-stream decode tok/s ({args.decode_tokens} tokens)"),
                       ("prefill_tok_s", f"prefill tok/s ({args.prefill_tokens}-token prompt)")):
        p, q = best(off["pagedllm"], key), best(off["llama.cpp"], key)
        rounds = " / ".join(fmt(r.get(key)) for r in off["pagedllm"]) + " vs " + " / ".join(
            fmt(r.get(key)) for r in off["llama.cpp"])
        rows.append(f"| {name} | {label} | {fmt(p)} | {fmt(q)} | {ratio(p, q)} ({rounds}) |")
    for c in served_concurrencies(res):
        ps = res["serve"].get("pagedllm", {}).get(str(c), [])
        qs = res["serve"].get("llama.cpp", {}).get(str(c), [])
        if not ps and not qs:
            continue
        p, q = best(ps, "output_throughput"), best(qs, "output_throughput")
        errs = [r["error"] for r in ps + qs if "error" in r or r.get("failed")]
        rounds = " / ".join(fmt(r.get("output_throughput")) for r in ps) + " vs " + " / ".join(
            fmt(r.get("output_throughput")) for r in qs)
        note = f"; errors: {' '.join(str(errs[0]).split())[:160].replace('|', '/')}" if errs else ""
        rows.append(f"| {name} | served output tok/s, concurrency {c} | {fmt(p)} | {fmt(q)} | "
                    f"{ratio(p, q)} ({rounds}{note}) |")
    mem = res["memory"]
    if mem:
        paged = mem.get("pagedllm")
        peer = [v for k, v in mem.items() if k.startswith("llama-server")]
        peer_max = max(peer, key=lambda v: v["rss_mib"]) if peer else None
        rows.append(
            f"| {name} | server RSS after the run, MiB (peak VmHWM) | "
            f"{fmt(paged and paged['rss_mib'], 0)} ({fmt(paged and paged['hwm_mib'], 0)}) | "
            f"{fmt(peer_max and peer_max['rss_mib'], 0)} ({fmt(peer_max and peer_max['hwm_mib'], 0)}) | "
            f"{ratio(paged and paged['rss_mib'], peer_max and peer_max['rss_mib'])} |")
    return rows


def plot(results: list[dict], args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        labels, ours, theirs = [], [], []
        for key, label in (("decode_tok_s", "decode"), ("prefill_tok_s", f"prefill\n{args.prefill_tokens}")):
            labels.append(label)
            ours.append(best(res["offline"]["pagedllm"], key) or 0)
            theirs.append(best(res["offline"]["llama.cpp"], key) or 0)
        for c in served_concurrencies(res):
            labels.append(f"served\nc={c}")
            ours.append(best(res["serve"].get("pagedllm", {}).get(str(c), []), "output_throughput") or 0)
            theirs.append(best(res["serve"].get("llama.cpp", {}).get(str(c), []), "output_throughput") or 0)
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], ours, 0.4, label="pagedllm", color="#2a6fdb")
        ax.bar([x + 0.2 for x in xs], theirs, 0.4, label="llama.cpp", color="#aaaaaa")
        for x, (o, t) in enumerate(zip(ours, theirs, strict=True)):
            if o and t:
                ax.annotate(f"{o / t:.2f}x", (x, max(o, t) * 1.03), ha="center", fontsize=9, fontweight="bold")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("tokens / s (log)")
        title = os.path.basename(res["model"]) + (f"\n[pagedllm {res['arith']}]" if res.get("arith", "default") != "default" else "")
        ax.set_title(title + ("\n(pagedllm cannot load it)" if res["pagedllm_error"] else ""), fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"{args.threads} threads each; {args.note}" if args.note else f"{args.threads} threads each",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: list[dict], host: dict, args: argparse.Namespace, command: str) -> str:
    lines = [
        BEGIN,
        "# Against llama.cpp, side by side",
        "",
        f"Reproduce: `{command}` (after `benchmarks/peers/build_llama_cpp.sh`, and "
        "`benchmarks/peers/make_checkpoints.py` for the 1B / 3B shapes; writes this section, "
        "`peers/peers.png` and `peers/peers.json`). The same GGUF file and thread count on both sides, "
        f"{args.rounds} alternating rounds, best round shown (every round in parentheses, pagedllm's vs "
        "llama.cpp's). llama.cpp: llama-bench and llama-server built from the llama-cpp-python "
        f"{os.environ.get('LLAMA_CPP_PYTHON_VERSION', '0.3.36')} sdist (GGML_NATIVE, AMX off). Serving: "
        f"`pagedllm bench serve`, {args.input_len}-token random prompts, {args.output_len} new tokens "
        f"(ignore_eos), {args.prompts_per_slot} x C prompts at concurrency C; llama-server with C slots. "
        "The 1B / 3B-shape checkpoints have random weights: their text is meaningless, their speed and "
        "memory are those of the real shapes. pagedllm multiplies GGUF blocks in exact fp32 unless a row "
        "says [pagedllm int8] (run with PAGEDLLM_CPU_INT8_DOT=on: int8 activations, like llama.cpp).",
        "",
        *[f"- {k}: {v}" for k, v in host.items()],
        f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        *([f"- note: {args.note}"] if args.note else []),
        "",
        "| model | measurement | pagedllm | llama.cpp | ratio (rounds) |",
        "|---|---|---:|---:|---|",
    ]
    for res in results:
        lines += model_rows(res, args, host)
    lines += ["", "![pagedllm vs llama.cpp](peers/peers.png)", "", END]
    return "\n".join(lines)


def write_section(path: str, text: str) -> None:
    old = open(path).read() if os.path.exists(path) else ""
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    with open(path, "w") as f:
        f.write(new)


def default_models(cache: str) -> list[str]:
    from pagedllm.model.loader.source import default_gguf_path

    found = sorted(glob.glob(os.path.join(cache, "checkpoints", "*", "*-Q4_K_M.gguf"))
                   + glob.glob(os.path.join(cache, "checkpoints", "*", "*-Q8_0.gguf")))
    return [default_gguf_path(), *found]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where build_llama_cpp.sh built llama.cpp")
    parser.add_argument("--models", nargs="+", default=None,
                        help="GGUF files, 'default' for the default model (default: the default model and "
                        "make_checkpoints.py's files)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="offline repetitions inside a round")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--decode-prompt-tokens", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--prompts-per-slot", type=int, default=2)
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--append", action="store_true",
                        help="keep the results of other models from the last run's peers.json (marked with their date)")
    parser.add_argument("--start-timeout-s", type=float, default=600)
    parser.add_argument("--serve-timeout-s", type=float, default=1800)
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="kill an engine whose process tree passes this RSS (default: 80%% of the memory "
                        "available at start) and report it")
    parser.add_argument("--note", default="", help="a line about the host (e.g. 'busy shared host')")
    parser.add_argument("--out-dir", default=HERE, help="peers.json and peers.png go here")
    parser.add_argument("--markdown", default=os.path.join(BENCH_DIR, "BENCHMARKS.md"),
                        help="file whose peers section is rewritten ('' to skip)")
    parser.add_argument("--offline-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.offline_worker:
        args.model = args.model_file
        return pagedllm_offline_worker(args)
    if args.memory_limit_gib is None:
        args.memory_limit_gib = default_memory_limit_gib()
    bin_dir = os.path.join(args.cache_dir, "build", "bin")
    for b in ("llama-bench", "llama-server"):
        if not os.access(os.path.join(bin_dir, b), os.X_OK):
            raise SystemExit(f"{bin_dir}/{b} is missing: run benchmarks/peers/build_llama_cpp.sh {args.cache_dir}")
    from pagedllm.model.loader.source import default_gguf_path

    models = [default_gguf_path() if m == "default" else m for m in args.models or default_models(args.cache_dir)]
    host = host_info(args.threads)
    log(f"host: {host}")
    results, kept = [], []
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, "peers.json")
    if args.append and os.path.exists(json_path):
        with open(json_path) as f:
            kept = [r for r in json.load(f)["results"] if (r["model"], r.get("arith", "default")) not in
                    {(m, arithmetic()) for m in models}]
    for model in models:
        t0 = time.time()
        results.append(run_model(model, args, bin_dir))
        results[-1]["wall_s"] = time.time() - t0
        results[-1]["host"] = host
        results[-1]["arith"] = arithmetic()
        log(f"{os.path.basename(model)} done in {results[-1]['wall_s']:.0f} s")
        with open(json_path, "w") as f:
            json.dump({"host": host, "args": vars(args), "results": kept + results}, f, indent=1)
    results = kept + results
    plot(results, args, os.path.join(args.out_dir, "peers.png"))
    command = "python benchmarks/peers/run_peers.py " + shlex.join(sys.argv[1:])
    text = markdown(results, host, args, command.strip())
    print(text)
    if args.markdown:
        write_section(args.markdown, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
