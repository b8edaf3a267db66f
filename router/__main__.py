"""``python -m router``: BanaServe's OpenAI-compatible router in front of SGLang workers.

Serves /v1/chat/completions, /v1/completions and SGLang's /generate (streaming and not),
/v1/models, /health, /workers and /metrics (Prometheus). Requests are validated here (bad input
gets a 400 with an OpenAI-style error body and never reaches a worker) and dispatched by the
chosen policy from live load: /v1/loads polled from every worker plus the router's own count of
requests in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from aiohttp import web

from router import policy
from router.app import create_app
from router.config import HealthConfig, RouterConfig

_D = RouterConfig(workers=("http://127.0.0.1:1",))
_H = HealthConfig()


def parse_args(argv: list[str] | None) -> RouterConfig:
    parser = argparse.ArgumentParser(
        prog="python -m router", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m router --workers http://127.0.0.1:31000 "
               "http://127.0.0.1:31001 --port 30000")
    parser.add_argument("--workers", nargs="+", required=True, metavar="URL",
                        help="SGLang worker base URLs, e.g. http://127.0.0.1:31000")
    parser.add_argument("--host", default=_D.host, help=f"listen address (default {_D.host})")
    parser.add_argument("--port", type=int, default=_D.port, help=f"listen port ({_D.port})")
    parser.add_argument("--policy", default=_D.policy,
                        help=f"dispatch policy, optionally with parameters, e.g. "
                             f"'load_aware:w_memory=0.5'; one of {', '.join(policy.names())} "
                             f"(default {_D.policy}; see router/policy/README.md)")
    parser.add_argument("--load-poll-interval", type=float, default=_D.load_poll_interval_s,
                        help=f"seconds between /v1/loads polls ({_D.load_poll_interval_s})")
    parser.add_argument("--health-interval", type=float, default=_H.interval_s,
                        help=f"seconds between health checks ({_H.interval_s})")
    parser.add_argument("--health-timeout", type=float, default=_H.timeout_s,
                        help=f"health check timeout in seconds ({_H.timeout_s})")
    parser.add_argument("--health-failure-threshold", type=int, default=_H.failure_threshold,
                        help=f"failed checks before a worker is unhealthy "
                             f"({_H.failure_threshold})")
    parser.add_argument("--health-success-threshold", type=int, default=_H.success_threshold,
                        help=f"passed checks before it is healthy again ({_H.success_threshold})")
    parser.add_argument("--max-connect-retries", type=int, default=_D.max_connect_retries,
                        help="other workers tried when one refuses the connection "
                             f"({_D.max_connect_retries})")
    parser.add_argument("--read-timeout", type=float, default=_D.read_timeout_s,
                        help=f"longest silence from a worker, seconds ({_D.read_timeout_s})")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder for prompt-length and token-id checks "
                             "(default: the folder the workers report, if readable here)")
    parser.add_argument("--log-level", default=_D.log_level,
                        choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    try:
        health = HealthConfig(args.health_interval, args.health_timeout,
                              args.health_failure_threshold, args.health_success_threshold)
        return RouterConfig(
            workers=tuple(args.workers), host=args.host, port=args.port, policy=args.policy,
            load_poll_interval_s=args.load_poll_interval, health=health,
            max_connect_retries=args.max_connect_retries, read_timeout_s=args.read_timeout,
            tokenizer_path=args.tokenizer, log_level=args.log_level)
    except ValueError as exc:
        parser.exit(2, f"router: {exc}\n")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(cfg)
    except ValueError as exc:
        print(f"router: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    web.run_app(app, host=cfg.host, port=cfg.port, handler_cancellation=True,
                access_log=None, print=lambda msg: logging.getLogger("router").info(
                    "listening on http://%s:%d (policy %s, %d workers)", cfg.host, cfg.port,
                    cfg.policy, len(cfg.workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
