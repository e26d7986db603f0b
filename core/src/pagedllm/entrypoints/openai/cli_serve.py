"""`pagedllm serve [MODEL]`: the server's command-line flags and entry point."""

from __future__ import annotations

import argparse
import logging
import sys

from pagedllm.errors import PagedLLMError


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def _non_negative_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return n


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from pagedllm.engine.engine_args import EngineArgs

    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="model directory or GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    EngineArgs.add_cli_args(parser)
    g = parser.add_argument_group("server")

    def add(flag: str, **kwargs) -> None:
        # EngineArgs may already define a flag the server also needs (one definition wins).
        if flag not in parser._option_string_actions:
            g.add_argument(flag, **kwargs)

    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    add("--port", type=int, default=8000)
    add("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes (or set PAGEDLLM_API_KEY)")
    add("--chat-template", default=None, help="chat template file (or inline Jinja) overriding the model's")
    add("--served-model-name", nargs="+", default=None,
        help="name(s) the API accepts as `model`; the first is reported in responses")
    add("--max-waiting-requests", type=_non_negative_int, default=None,
        help="admit at most max_num_seqs + this many requests at once; more get HTTP 429")
    add("--shutdown-timeout", type=float, default=30.0,
        help="seconds SIGTERM waits for in-flight requests before aborting them")
    add("--max-request-body-bytes", type=_positive_int, default=8 * 1024 * 1024,
        help="larger request bodies get HTTP 413")
    add("--data-parallel-size", type=_positive_int, default=1,
        help="engine-core processes behind this server (CPU cores split between them), each request routed "
        "by its cached prefix vs load (see README: Replicas)")
    add("--uvicorn-log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"])
    return parser


def serve_main(args: argparse.Namespace) -> int:
    from pagedllm.entrypoints.openai.api_server import run_server

    if args.model_tag is not None:
        if getattr(args, "model", None) not in (None, args.model_tag):
            print(f"error: model given twice ({args.model_tag!r} and --model {args.model!r})", file=sys.stderr)
            return 2
        args.model = args.model_tag
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_server(args)
    except PagedLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
