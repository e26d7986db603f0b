"""`pagedllm serve [MODEL]`: the server's command-line flags and entry point."""

from __future__ import annotations

import argparse
import logging
import os
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
    add("--enable-auto-tool-choice", action="store_true", default=False,
        help="let tool_choice 'auto' return tool calls, found in the output by --tool-call-parser")
    add("--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
        help="the model's tool-call format: hermes (Hermes/Qwen <tool_call>) or llama3_json")
    add("--data-parallel-size", type=_positive_int, default=1,
        help="engine-core processes behind this server (CPU cores split between them), each request routed "
        "by its cached prefix vs load (see README: Replicas)")
    add("--uvicorn-log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"])
    add("--enable-tokenizer-info-endpoint", action="store_true",
        help="serve GET /tokenizer_info (tokenizer configuration and chat template), as lm-eval's "
             "tokenizer_backend=remote needs")
    add("--disable-uvicorn-access-log", action="store_true",
        help="do not log each request line (method, path, status) to the uvicorn.access log")
    return parser


def serve_main(args: argparse.Namespace) -> int:
    from pagedllm.entrypoints.openai.api_server import run_server

    if getattr(args, "enable_auto_tool_choice", False) and not getattr(args, "tool_call_parser", None):
        print("error: --enable-auto-tool-choice needs --tool-call-parser (hermes or llama3_json)", file=sys.stderr)
        return 2

    if args.model_tag is not None:
        if getattr(args, "model", None) not in (None, args.model_tag):
            print(f"error: model given twice ({args.model_tag!r} and --model {args.model!r})", file=sys.stderr)
            return 2
        args.model = args.model_tag
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = run_server(args)
    except PagedLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    # The engine process is stopped and every response sent. The interpreter's teardown of torch and
    # transformers would add a second or more to every exit (SIGTERM included): skip it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
