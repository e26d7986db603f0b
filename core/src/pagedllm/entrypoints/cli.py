"""The `pagedllm` command line: serve, generate, bench, env."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from pagedllm.errors import PagedLLMError


def _env(args: argparse.Namespace) -> int:
    from pagedllm.entrypoints.env_report import print_env

    return print_env(args.platform)


def _generate(args: argparse.Namespace) -> int:
    from pagedllm.engine.engine_args import EngineArgs
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sample.sampling_params import SamplingParams

    engine_args = EngineArgs.from_cli_args(args)
    llm = LLM(**{k: v for k, v in vars(engine_args).items()})
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.sampling_seed,
    )
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    for out in outputs:
        print(out.outputs[0].text)
    return 0


def _add_generate(p: argparse.ArgumentParser) -> None:
    from pagedllm.engine.engine_args import EngineArgs

    p.add_argument("prompt", nargs="+", help="prompt text (several prompts run as one batch)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=_generate)


def _add_serve(p: argparse.ArgumentParser) -> None:
    from pagedllm.entrypoints.openai.cli_serve import add_serve_args, serve_main

    add_serve_args(p)
    p.set_defaults(func=serve_main)


def _add_bench(p: argparse.ArgumentParser) -> None:
    bench_sub = p.add_subparsers(dest="bench_cmd", required=True)
    for name in ("throughput", "latency", "serve"):
        module = __import__(f"pagedllm.bench.{name}", fromlist=["add_cli_args", "main"])
        bp = bench_sub.add_parser(name, help=(module.__doc__ or name).strip().splitlines()[0])
        module.add_cli_args(bp)
        bp.set_defaults(func=module.main)


def _add_router(p: argparse.ArgumentParser) -> None:
    from pagedllm.router.cli import add_router_args, router_main

    add_router_args(p)
    p.set_defaults(func=router_main)


def _add_env(p: argparse.ArgumentParser) -> None:
    p.add_argument("--platform", default=None, help="explain the selection of this platform")
    p.set_defaults(func=_env)


# Each command's arguments are added only when that command runs, so `pagedllm env` never
# imports the server or the engine.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "serve": ("OpenAI-compatible HTTP server (default model if none is named)", _add_serve),
    "generate": ("generate text for one or more prompts (offline)", _add_generate),
    "bench": ("benchmarks: throughput, latency (offline), serve (online)", _add_bench),
    "router": ("OpenAI-compatible router in front of several `pagedllm serve` replicas", _add_router),
    "env": ("installed platform plugins, which one is selected and why", _add_env),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    import pagedllm

    parser = argparse.ArgumentParser(prog="pagedllm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pagedllm {pagedllm.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            add(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except PagedLLMError as exc:
        print(f"pagedllm: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
