"""`pagedllm router`: one OpenAI-compatible URL in front of several `pagedllm serve` replicas."""

from __future__ import annotations

import argparse
import logging
import sys

from pagedllm.router.policy import POLICIES


def add_router_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--replica", action="append", required=True, metavar="URL[,events=EP,snapshot=EP]",
                        help="a `pagedllm serve` URL, with its --kv-events-config endpoints for KV-aware "
                        "routing (repeat for each replica)")
    parser.add_argument("--policy", default="kv_aware", choices=sorted(POLICIES),
                        help="kv_aware (default): cached prefix vs load, see README; least_load; round_robin")
    parser.add_argument("--load-cost-tokens", type=float, default=32.0,
                        help="kv_aware: prompt tokens one queued request is worth (higher favours balance)")
    parser.add_argument("--model", default=None,
                        help="the replicas' model (for tokenizing prompts router-side; default the embedded one)")
    parser.add_argument("--chat-template", default=None, help="the replicas' --chat-template, if they use one")
    parser.add_argument("--health-interval", type=float, default=2.0, help="seconds between health checks")
    parser.add_argument("--max-attempts", type=int, default=3,
                        help="replicas tried for a request that was not admitted (connection refused, 503, 429)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--uvicorn-log-level", default="warning",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    return parser


def router_main(args: argparse.Namespace) -> int:
    import uvicorn

    from pagedllm.router.app import RouterSettings, build_router_app
    from pagedllm.router.policy import make_policy
    from pagedllm.router.prompt_tokens import PromptTokenizer
    from pagedllm.router.replica_pool import ReplicaPool, ReplicaSpec

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per proxied request otherwise
    try:
        specs = [ReplicaSpec.parse(text) for text in args.replica]
        policy = make_policy(args.policy, args.load_cost_tokens)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.health_interval <= 0 or args.max_attempts < 1:
        print("error: --health-interval must be > 0 and --max-attempts >= 1", file=sys.stderr)
        return 2
    tokenizer = None
    if policy.uses_prefix:
        if not any(s.events for s in specs):
            logging.warning("no replica has events=/snapshot= endpoints: kv_aware routing falls back to load")
        tokenizer = PromptTokenizer.for_model(args.model, args.chat_template)
    app = build_router_app(ReplicaPool(specs, args.health_interval), policy, tokenizer,
                           RouterSettings(max_attempts=args.max_attempts))
    logging.info("routing %s over %d replica(s) on http://%s:%d", policy.name, len(specs), args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                access_log=args.uvicorn_log_level in ("debug", "trace"))
    return 0
