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

from router.admission import AdmissionConfig
from router.app import create_app
from router.batching.config import BatcherConfig
from router.batching.slo_odbs import BatchingConfig, ServiceModel
from router.breaker import BreakerConfig
from router.cli_fields import add_flags, flag_name, from_args, values_from_args
from router.config import DiscoveryConfig, HealthConfig, RetryConfig, RouterConfig
from router.length import LengthConfig
from router.rebalance.config import RebalanceConfig

_DISCOVERY = (
    "The router lists and watches pods by label selector and adds each ready pod "
    "(Running, with a podIP, not terminating, Ready condition True) as the worker "
    "http://{podIP}:{--service-discovery-port}; pods that go away or stop being ready are "
    "drained. The flags match smg's (SGLang's router) in name and meaning. The service "
    "account needs get/list/watch on pods; see docs/service_discovery.md.")
_BATCHING = (
    "With --batching, requests wait in the router until a worker has a free slot (at most "
    "--batch-slots-per-worker each); the policy then groups everything waiting into "
    "batches and sends the first batch to the least busy worker. A request's SLO comes "
    "from the body field slo_ms or the X-BanaServe-SLO-Ms header (milliseconds, end to "
    "end), its output length from X-BanaServe-Output-Length, else --length-predictor, "
    "else max_tokens. The worker is told both in custom_params (banaserve_slo_ms, "
    "banaserve_predicted_len) for its own SLO-ODBS queue (--queue-policy on the launcher).")
_REBALANCE = (
    "With --rebalance, every period the router reads each worker's compute and KV "
    "utilisation (/v1/loads, smoothed) and GET /banaserve/status, and migrates layers "
    "(sustained compute imbalance), offloads attention heads' KV (memory pressure), or undoes "
    "either, through the workers' /banaserve/ control API. Decisions are logged with their "
    "reasons and shown by GET /rebalance. Workers need the migration patches and layer "
    "hosts (python -m runtime_patches.launch --layer-host ...).")


def build_parser() -> argparse.ArgumentParser:
    """The CLI: each flag, its help and default come from a config field (``router.cli_fields``);
    this function only lays the flags out, in groups."""
    parser = argparse.ArgumentParser(
        prog="python -m router", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m router --workers http://127.0.0.1:31000 "
               "http://127.0.0.1:31001 --port 30000\n"
               "in Kubernetes: python -m router --service-discovery --selector app=sglang "
               "--service-discovery-port 30000")
    add_flags(parser, RouterConfig, "workers")
    pd = parser.add_argument_group("prefill/decode disaggregation (instead of --workers)")
    add_flags(pd, RouterConfig, "prefill", "decode", "prefill_policy", "decode_policy")
    add_flags(parser, RouterConfig, "host", "port", "policy", "load_poll_interval_s")
    add_flags(parser, HealthConfig)
    hard = parser.add_argument_group("retries, circuit breaker, admission, timeouts, auth")
    add_flags(hard, RetryConfig)
    add_flags(hard, BreakerConfig, "failure_threshold", "open_s", "success_threshold")
    add_flags(hard, AdmissionConfig)
    add_flags(hard, RouterConfig, "request_timeout_s", "api_key", "shutdown_timeout_s")
    add_flags(parser, RouterConfig, "read_timeout_s", "tokenizer_path")
    add_flags(parser.add_argument_group(
        "output-length prediction (UELLM's profiler, profiler_ft)"), LengthConfig)
    disc = parser.add_argument_group(
        "Kubernetes service discovery (alongside or instead of --workers/--prefill/--decode)",
        _DISCOVERY)
    add_flags(disc, RouterConfig, "discovery")
    add_flags(disc, DiscoveryConfig)
    batch = parser.add_argument_group(
        "SLO-aware batching (UELLM's SLO-ODBS; see docs/slo_odbs.md)", _BATCHING)
    add_flags(batch, BatchingConfig, "policy")
    add_flags(batch, BatcherConfig, "window_ms", "slots_per_worker")
    add_flags(batch, BatchingConfig, "max_batch")
    add_flags(batch, BatcherConfig, "default_slo_ms")
    add_flags(batch, BatchingConfig, "w1", "w2", "threshold")
    add_flags(batch, ServiceModel)
    rebalance = parser.add_argument_group(
        "dynamic rebalancing (BanaServe's decision flow; see docs/rebalancer.md)", _REBALANCE)
    add_flags(rebalance, RouterConfig, "rebalance")
    add_flags(rebalance, RebalanceConfig, "dry_run")
    add_flags(rebalance, RebalanceConfig, skip=("dry_run",))
    add_flags(parser, RouterConfig, "sidecar", "kv_index", "kvstore", "cache_report_interval_s",
              "log_level")
    return parser


def parse_args(argv: list[str] | None) -> RouterConfig:
    """``argv`` -> the config; a bad value exits with status 2 and one line naming it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # built in this order so that of several bad values, the same one is reported
        parts = {"health": from_args(HealthConfig, args), "retry": from_args(RetryConfig, args),
                 "breaker": from_args(BreakerConfig, args),
                 "admission": from_args(AdmissionConfig, args),
                 "length": from_args(LengthConfig, args) if args.length_predictor else None,
                 "batching": _batching_config(args)}
        own = values_from_args(RouterConfig, args, skip=(*parts, "rebalance", "discovery"))
        return RouterConfig(
            **own, **parts, rebalance=from_args(RebalanceConfig, args) if args.rebalance else None,
            discovery=_discovery_config(args))
    except ValueError as exc:
        parser.exit(2, f"router: {exc}\n")


def _discovery_config(args: argparse.Namespace) -> DiscoveryConfig | None:
    values = values_from_args(DiscoveryConfig, args)  # parses the selectors either way
    if args.service_discovery:
        return DiscoveryConfig(**values)
    given = [flag_name(DiscoveryConfig, name) for name in (
        "selector", "prefill_selector", "decode_selector", "api_url", "namespace")
        if values[name]]
    if given:
        raise ValueError(f"{', '.join(given)}: only with --service-discovery")
    return None


def _batching_config(args: argparse.Namespace) -> BatcherConfig | None:
    if args.batching == "none":
        return None
    batching = from_args(BatchingConfig, args, service=from_args(ServiceModel, args))
    return from_args(BatcherConfig, args, batching=batching)


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
    fleet = (f"{len(cfg.prefill)} prefill + {len(cfg.decode)} decode workers" if cfg.pd_mode
             else f"{len(cfg.workers)} workers")
    if cfg.discovery is not None:
        fleet += " + Kubernetes service discovery"
    web.run_app(app, host=cfg.host, port=cfg.port, handler_cancellation=True,
                shutdown_timeout=cfg.shutdown_timeout_s,
                access_log=None, print=lambda msg: logging.getLogger("router").info(
                    "listening on http://%s:%d (policy %s, %s)", cfg.host, cfg.port,
                    cfg.policy, fleet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
