"""The API server's own cost per streamed token, with the model taken out.

`pagedllm serve`'s frontend (HTTP, output processing, detokenization, SSE) runs in one process and
the engine core in another; on a 2-core host every millisecond the frontend spends per token is
taken from the engine's threads. This benchmark serves the default model's tokenizer through the
real frontend (AsyncLLM, the OpenAI routes, uvicorn) in front of a stand-in engine core that does
no model work: each step sleeps ``--step-ms`` (so it takes no CPU) and gives every running request
one token of real text. `pagedllm bench serve` then streams completions at each concurrency and the
server process's CPU time is read from /proc before and after.

    python benchmarks/bench_serve_frontend.py --concurrency 16 64 --rounds 2

Reported per concurrency: frontend CPU ms per streamed token (the figure that matters: it is the
same on a busy host, where wall-clock times are not), its CPU seconds, output tok/s, and the
benchmark client's CPU (the same for any server). The stand-in core is named as such and used only
here; it never serves a user.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


class StandInEngineCore:
    """No model: each step sleeps, then every running request gets one token (ignore_eos, max_tokens)."""

    def __init__(self, config) -> None:
        from pagedllm.model.loader import load_tokenizer

        self.config = config
        self.tokenizer_info = load_tokenizer(config.model)
        config.cache.num_blocks = config.cache.num_blocks or 4096
        self.step_s = float(os.environ.get("BENCH_FRONTEND_STEP_MS", "50")) / 1000
        self.running: dict = {}
        self.generated = 0

    def add_request(self, req) -> None:
        self.running[req.request_id] = (req, 0)

    def abort_requests(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.running.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def step(self):
        from pagedllm.engine.types import EngineCoreOutput

        time.sleep(self.step_s)
        outs = []
        for rid, (req, n) in list(self.running.items()):
            prompt = req.prompt_token_ids
            token = prompt[n % len(prompt)]  # the prompt's words again: realistic text to detokenize
            n += 1
            done = n >= (req.sampling_params.max_tokens or 16)
            outs.append(EngineCoreOutput(request_id=rid, index=0, new_token_ids=[token],
                                         finish_reason="length" if done else None))
            self.generated += 1
            if done:
                del self.running[rid]
            else:
                self.running[rid] = (req, n)
        return outs

    def stats(self):
        from pagedllm.engine.types import EngineCoreStats

        return EngineCoreStats(num_running=len(self.running), num_blocks=self.config.cache.num_blocks,
                               generation_tokens=self.generated)


def serve(port: int, max_num_seqs: int) -> int:
    """The real frontend and HTTP server in front of the stand-in core (run in a child process)."""
    import asyncio

    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.engine.engine_args import EngineArgs
    from pagedllm.entrypoints.openai.api_server import serve_engine
    from pagedllm.entrypoints.openai.serving_common import ServerSettings
    from pagedllm.metrics import ServerMetrics
    from pagedllm.model.loader.source import default_gguf_path

    async def main() -> int:
        config = EngineArgs.from_kwargs(model=default_gguf_path(), max_num_seqs=max_num_seqs,
                                        max_model_len=512).create_engine_config()
        engine = await AsyncLLM.from_config(config, core_factory="bench_serve_frontend:StandInEngineCore")
        settings = ServerSettings(served_model_names=["stand-in"])
        engine.metrics = ServerMetrics("stand-in")
        return await serve_engine(engine, settings, "127.0.0.1", port, 5.0, "warning", access_log=False)

    return asyncio.run(main())  # as run_server does


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, pid: int, concurrency: int, args: argparse.Namespace, seed: int) -> dict:
    num = max(4, args.prompts_per_slot * concurrency)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "bench", "serve", "--base-url", url,
               "--num-prompts", str(num), "--input-len", str(args.input_len), "--output-len", str(args.output_len),
               "--max-concurrency", str(concurrency), "--seed", str(seed), "--result-json", out.name]
        before = _cpu_s(pid)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        after = _cpu_s(pid)
        if r.returncode != 0:
            raise SystemExit(f"bench serve failed: {r.stderr[-500:]}")
        with open(out.name) as f:
            summary = json.load(f)["summary"]
    tokens = summary["total_output_tokens"]
    # The server's CPU includes answering bench serve's /tokenize calls (one per prompt, before timing).
    return {"concurrency": concurrency, "output_tokens": tokens, "output_tok_s": summary["output_throughput"],
            "server_cpu_s": after - before, "server_cpu_ms_per_token": 1000 * (after - before) / max(1, tokens),
            "client_cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
            "tpot_ms_median": summary["tpot_ms"]["median"], "failed": summary["failed"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--prompts-per-slot", type=int, default=2)
    parser.add_argument("--step-ms", type=float, default=50.0, help="the stand-in core's sleep per step")
    parser.add_argument("--out", default=None, help="write every round's figures here (JSON)")
    parser.add_argument("--serve-port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_port is not None:
        return serve(args.serve_port, max(args.concurrency))
    port = _free_port()
    env = dict(os.environ, BENCH_FRONTEND_STEP_MS=str(args.step_ms), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-port", str(port),
                               "--concurrency", *map(str, args.concurrency)], env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the frontend server did not start") from None
                time.sleep(0.5)
        for r in range(args.rounds):
            for c in args.concurrency:
                row = measure(url, server.pid, c, args, seed=1000 * (r + 1) + c)
                row["round"] = r + 1
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rounds": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
