"""Online serving benchmark against an OpenAI-compatible server: TTFT, TPOT, ITL, E2E and throughput.

Synthetic random prompts of --input-len tokens, --output-len tokens each (ignore_eos sent as an extra
body field, which vLLM, pagedllm and llama.cpp's llama-server honour), Poisson arrivals at
--request-rate or a fixed --max-concurrency, every response streamed. Only loopback servers unless --allow-remote.
--workload shared-prefix / multi-turn reuse prompt prefixes (see ``bench/workloads.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import httpx

from pagedllm.bench.workloads import WORKLOADS, make_sessions, render

# Common short English words: each is about one token for BPE vocabularies.
_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part"
).split()


@dataclass(slots=True)
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    start_s: float = 0.0  # since the benchmark started
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    text: str = ""  # the generated text (multi-turn prompts include it)
    replica: str = ""  # x-pagedllm-replica, when a router served it

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    parser.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="Poisson arrival rate in requests/s (default inf: all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="let requests stop at EOS (default: generate exactly --output-len tokens)")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--result-json", default=None, help="write the summary and per-request results here")
    parser.add_argument("--plot", default=None, help="write TTFT/ITL/E2E plots to this PNG (matplotlib)")
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --base-url")
    parser.add_argument("--workload", choices=WORKLOADS, default="random",
                        help="random prompts; shared-prefix: --num-prefixes system prompts of --prefix-len words "
                        "shared by --num-prompts requests; multi-turn: --num-prompts conversations of --num-turns")
    parser.add_argument("--num-prefixes", type=int, default=8, help="shared-prefix: distinct system prompts")
    parser.add_argument("--prefix-len", type=int, default=256, help="shared-prefix/multi-turn: system prompt words")
    parser.add_argument("--num-turns", type=int, default=4, help="multi-turn: turns per conversation")
    return parser


def _check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a host name other than localhost: treated as remote
        address = None
    if address is not None and address.is_loopback:
        return
    raise SystemExit(f"--base-url {url} is not a loopback address; pass --allow-remote to benchmark it")


# The two /tokenize dialects a server may speak: vLLM's (and pagedllm's) and llama.cpp's llama-server.
# Each maps a text to its request body, and names the key of /detokenize's answer.
_TOKENIZE_DIALECTS = {
    "vllm": (lambda model, text: {"model": model, "prompt": text, "add_special_tokens": False}, "prompt"),
    "llama.cpp": (lambda model, text: {"content": text, "add_special": False}, "content"),
}


async def _tokenize_dialect(client: httpx.AsyncClient, model: str, probe: str) -> str | None:
    """Which /tokenize dialect the server answers with tokens for ``probe``; None when it has no /tokenize.

    A server that ignores a body it does not understand (llama-server answers vLLM's body with 200 and
    no tokens) is not taken for a tokenizer: a dialect counts only when it returns tokens.
    """
    for name, (body, _) in _TOKENIZE_DIALECTS.items():
        try:
            r = await client.post("/tokenize", json=body(model, probe))
        except httpx.HTTPError:
            return None
        if r.status_code == 404:
            return None
        if r.status_code == 200 and _token_ids(r):
            return name
    return None


def _token_ids(r: httpx.Response) -> list[int]:
    try:
        tokens = r.json().get("tokens") or []
    except (ValueError, AttributeError):
        return []
    return [t["id"] if isinstance(t, dict) else t for t in tokens]


async def _make_prompts(client: httpx.AsyncClient, args: argparse.Namespace, model: str) -> list[str | list[int]]:
    """Random word prompts, cut to exactly --input-len tokens when the server has /tokenize.

    Speaks vLLM's and llama-server's /tokenize and /detokenize (detected from the answers); without
    either the prompts stay text of about --input-len tokens. Never returns an empty prompt.
    """
    rng = random.Random(args.seed)
    prompts: list[str | list[int]] = []
    for _ in range(args.num_prompts):
        text = " ".join(rng.choice(_WORDS) for _ in range(args.input_len + 8))
        prompts.append(text)
    dialect = await _tokenize_dialect(client, model, prompts[0])
    if dialect is None:
        return prompts
    body, detok_key = _TOKENIZE_DIALECTS[dialect]
    exact: list[str | list[int]] = []
    for text in prompts:
        r = await client.post("/tokenize", json=body(model, text))
        r.raise_for_status()
        ids = _token_ids(r)[: args.input_len]
        if not ids:
            raise SystemExit(f"the server's /tokenize ({dialect} dialect) returned no tokens for a "
                             f"{len(text)}-character prompt: refusing to send an empty prompt")
        if args.endpoint == "completions":
            exact.append(ids)
        else:
            d = await client.post("/detokenize", json={"model": model, "tokens": ids} if dialect == "vllm"
                                  else {"tokens": ids})
            d.raise_for_status()
            detok = d.json().get(detok_key) or ""
            if not detok.strip():
                raise SystemExit(f"the server's /detokenize ({dialect} dialect) returned an empty text for "
                                 f"{len(ids)} tokens: refusing to send an empty prompt")
            exact.append(detok)
    return exact


async def _one_request(client: httpx.AsyncClient, args: argparse.Namespace, model: str,
                       prompt: str | list[int], t0: float) -> RequestResult:
    body: dict = {"model": model, "max_tokens": args.output_len, "stream": True, "temperature": 0.0,
                  "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint == "completions":
        path = "/v1/completions"
        body["prompt"] = prompt
    else:
        path = "/v1/chat/completions"
        is_messages = isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)
        body["messages"] = prompt if is_messages else [{"role": "user", "content": prompt}]
    res = RequestResult(ok=False)
    start = time.perf_counter()
    res.start_s = start - t0
    last = start
    chunks = 0
    try:
        async with client.stream("POST", path, json=body, timeout=args.request_timeout) as resp:
            res.replica = resp.headers.get("x-pagedllm-replica", "")
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = obj["error"].get("message", "error chunk")
                    return res
                if obj.get("usage"):
                    res.prompt_tokens = obj["usage"]["prompt_tokens"]
                    res.output_tokens = obj["usage"]["completion_tokens"]
                choices = obj.get("choices") or []
                piece = "".join((c.get("text") or (c.get("delta") or {}).get("content") or "") for c in choices)
                if not piece:
                    continue
                res.text += piece
                now = time.perf_counter()
                if chunks == 0:
                    res.ttft_s = now - start
                else:
                    res.itl_s.append(now - last)
                last = now
                chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.e2e_s = time.perf_counter() - start
    res.output_tokens = res.output_tokens or chunks
    res.ok = True
    return res


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0}
    s = sorted(values)

    def pct(p: float) -> float:
        k = (len(s) - 1) * p / 100
        lo, hi = math.floor(k), math.ceil(k)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {"mean": sum(s) / len(s), "median": pct(50), "p90": pct(90), "p99": pct(99)}


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    ms = lambda xs: {k: 1000 * v for k, v in _percentiles(xs).items()}  # noqa: E731
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_throughput": out_tokens / duration_s if duration_s > 0 else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s if duration_s > 0 else 0.0,
        "ttft_ms": ms([r.ttft_s for r in ok]),
        "tpot_ms": ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_ms": ms([x for r in ok for x in r.itl_s]),
        "e2e_ms": ms([r.e2e_s for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
    }


def format_summary(s: dict) -> str:
    lines = [
        "=" * 20 + " Serving Benchmark Result " + "=" * 20,
        f"{'Successful requests:':<40}{s['completed']}",
        f"{'Failed requests:':<40}{s['failed']}",
        f"{'Benchmark duration (s):':<40}{s['duration_s']:.2f}",
        f"{'Total input tokens:':<40}{s['total_input_tokens']}",
        f"{'Total generated tokens:':<40}{s['total_output_tokens']}",
        f"{'Request throughput (req/s):':<40}{s['request_throughput']:.2f}",
        f"{'Output token throughput (tok/s):':<40}{s['output_throughput']:.2f}",
        f"{'Total token throughput (tok/s):':<40}{s['total_token_throughput']:.2f}",
    ]
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st)"),
                       ("itl_ms", "Inter-token Latency"), ("e2e_ms", "End-to-end Latency")):
        lines.append("-" * 20 + f" {title} " + "-" * 20)
        short = key.split("_")[0].upper()
        for stat in ("mean", "median", "p90", "p99"):
            label = f"{stat.capitalize()} {short} (ms):"
            lines.append(f"{label:<40}{s[key][stat]:.2f}")
    if s["errors"]:
        lines.append("errors: " + "; ".join(s["errors"]))
    lines.append("=" * 66)
    return "\n".join(lines)


def plot(results: list[RequestResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].hist([1000 * r.ttft_s for r in ok], bins=30)
    axes[0].set(title="Time to first token", xlabel="ms", ylabel="requests")
    axes[1].hist([1000 * x for r in ok for x in r.itl_s], bins=30)
    axes[1].set(title="Inter-token latency", xlabel="ms", ylabel="tokens")
    axes[2].scatter([r.start_s for r in ok], [r.e2e_s for r in ok], s=8)
    axes[2].set(title="End-to-end latency by arrival", xlabel="arrival (s)", ylabel="e2e (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def run(args: argparse.Namespace) -> tuple[dict, list[RequestResult]]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or max(1, args.num_prompts))
    async with httpx.AsyncClient(base_url=args.base_url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=args.request_timeout) as client:
        model = args.model
        if model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        if args.workload == "random":
            prompts = await _make_prompts(client, args, model)
        else:
            sessions = make_sessions(args.workload, random.Random(args.seed), _WORDS, args.num_prompts,
                                     args.num_prefixes, args.prefix_len, args.input_len, args.num_turns)
        rng = random.Random(args.seed + 1)
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        t0 = time.perf_counter()

        async def limited(prompt: str | list) -> RequestResult:
            if sem is None:
                return await _one_request(client, args, model, prompt, t0)
            async with sem:
                return await _one_request(client, args, model, prompt, t0)

        async def session(s) -> list[RequestResult]:
            out: list[RequestResult] = []
            for turn in range(len(s.turns)):
                res = await limited(render(s, [r.text for r in out], turn, args.endpoint))
                out.append(res)
                if not res.ok:
                    break
            return out

        tasks = []
        for item in (prompts if args.workload == "random" else sessions):
            tasks.append(asyncio.create_task(limited(item) if args.workload == "random" else session(item)))
            if math.isfinite(args.request_rate) and args.request_rate > 0:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        done = await asyncio.gather(*tasks)
        results = [r for item in done for r in (item if isinstance(item, list) else [item])]
        duration = time.perf_counter() - t0
    return summarize(results, duration), results


def main(args: argparse.Namespace) -> int:
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        print("error: --num-prompts, --input-len and --output-len must be >= 1", file=sys.stderr)
        return 2
    if not args.allow_remote:
        _check_loopback(args.base_url)
    summary, results = asyncio.run(run(args))
    print(format_summary(summary))
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k != "func"}, "summary": summary,
                       "requests": [asdict(r) for r in results]}, f, indent=2, default=str)
    if args.plot:
        plot(results, args.plot)
    return 0 if summary["completed"] else 1
