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
import dataclasses
import logging
import os
import sys

from aiohttp import web

from router import policy
from router.admission import AdmissionConfig
from router.app import create_app
from router.batcher import BatcherConfig
from router.breaker import BreakerConfig
from router.config import (
    DiscoveryConfig,
    HealthConfig,
    PrefillWorker,
    RetryConfig,
    RouterConfig,
    parse_selector,
)
from router.length import LengthConfig
from router.rebalance.config import RebalanceConfig
from router.sidecar.slo_odbs import POLICIES, BatchingConfig, ServiceModel

_D = RouterConfig(workers=("http://127.0.0.1:1",))  # only for its defaults
_H, _R, _B, _A = HealthConfig(), RetryConfig(), BreakerConfig(), AdmissionConfig()
_L = LengthConfig(path="-")  # only for its defaults
_BC = BatcherConfig()
_BB = BatchingConfig()
_BS = ServiceModel()
_RB = RebalanceConfig()
_DC = DiscoveryConfig(selector=(("app", "x"),))  # only for its defaults


def _prefill_workers(groups: list[list[str]]) -> tuple[PrefillWorker, ...]:
    workers = []
    for group in groups:
        if len(group) > 2:
            raise ValueError(f"--prefill takes URL [BOOTSTRAP_PORT], got {' '.join(group)}")
        try:
            port = int(group[1]) if len(group) == 2 else None
        except ValueError:
            raise ValueError(f"--prefill bootstrap port {group[1]!r} is not a number") from None
        workers.append(PrefillWorker(group[0], port))
    return tuple(workers)


def parse_args(argv: list[str] | None) -> RouterConfig:
    parser = argparse.ArgumentParser(
        prog="python -m router", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m router --workers http://127.0.0.1:31000 "
               "http://127.0.0.1:31001 --port 30000\n"
               "in Kubernetes: python -m router --service-discovery --selector app=sglang "
               "--service-discovery-port 30000")
    parser.add_argument("--workers", nargs="+", default=[], metavar="URL",
                        help="SGLang worker base URLs, e.g. http://127.0.0.1:31000")
    pd = parser.add_argument_group("prefill/decode disaggregation (instead of --workers)")
    pd.add_argument("--prefill", nargs="+", action="append", default=[],
                    metavar=("URL", "BOOTSTRAP_PORT"),
                    help="a prefill worker and, optionally, its --disaggregation-bootstrap-port "
                         "(repeat for more prefill workers)")
    pd.add_argument("--decode", nargs="+", action="append", default=[], metavar="URL",
                    help="decode worker base URLs (repeatable)")
    pd.add_argument("--prefill-policy", default=None,
                    help="policy for choosing the prefill worker (default: --policy)")
    pd.add_argument("--decode-policy", default=None,
                    help="policy for choosing the decode worker (default: --policy)")
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
    parser.add_argument("--health-busy-grace", type=float, default=_H.busy_grace_s,
                        help="seconds a worker with requests in flight may leave health checks "
                             "unanswered (SGLang answers /health only between forward passes) "
                             f"before they count as failures ({_H.busy_grace_s})")
    hard = parser.add_argument_group("retries, circuit breaker, admission, timeouts, auth")
    hard.add_argument("--max-retries", type=int, default=_R.max_retries,
                      help="retries on another worker after a connection error, timeout or 5xx "
                           f"before the first byte reached the client ({_R.max_retries})")
    hard.add_argument("--retry-initial-backoff", type=float, default=_R.initial_backoff_s,
                      help=f"first retry delay in seconds, doubled each retry "
                           f"({_R.initial_backoff_s})")
    hard.add_argument("--retry-max-backoff", type=float, default=_R.max_backoff_s,
                      help=f"largest retry delay in seconds ({_R.max_backoff_s})")
    hard.add_argument("--breaker-failure-threshold", type=int, default=_B.failure_threshold,
                      help=f"consecutive failures that open a worker's breaker "
                           f"({_B.failure_threshold})")
    hard.add_argument("--breaker-open-seconds", type=float, default=_B.open_s,
                      help=f"seconds an open breaker waits before probing ({_B.open_s})")
    hard.add_argument("--breaker-success-threshold", type=int, default=_B.success_threshold,
                      help=f"successful probes that close it ({_B.success_threshold})")
    hard.add_argument("--max-concurrent-requests", type=int, default=_A.max_concurrent,
                      help="requests forwarded at once; 0 means unlimited "
                           f"({_A.max_concurrent})")
    hard.add_argument("--max-queued-requests", type=int, default=_A.max_queued,
                      help=f"requests waiting for a slot before 429 ({_A.max_queued})")
    hard.add_argument("--queue-timeout", type=float, default=_A.queue_timeout_s,
                      help=f"longest wait for a slot in seconds before 429 ({_A.queue_timeout_s})")
    hard.add_argument("--retry-after", type=int, default=_A.retry_after_s,
                      help=f"Retry-After seconds sent with 429 ({_A.retry_after_s})")
    hard.add_argument("--request-timeout", type=float, default=_D.request_timeout_s,
                      help=f"longest a request may take end to end ({_D.request_timeout_s} s)")
    hard.add_argument("--api-key", default=os.environ.get("BANASERVE_API_KEY"),
                      help="require 'Authorization: Bearer KEY' (default: $BANASERVE_API_KEY; "
                           "/health and /metrics stay open)")
    hard.add_argument("--shutdown-timeout", type=float, default=_D.shutdown_timeout_s,
                      help=f"seconds in-flight requests get to finish on SIGTERM "
                           f"({_D.shutdown_timeout_s})")
    parser.add_argument("--read-timeout", type=float, default=_D.read_timeout_s,
                        help=f"longest silence from a worker, seconds ({_D.read_timeout_s})")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder for prompt-length and token-id checks "
                             "(default: the folder the workers report, if readable here)")
    lp = parser.add_argument_group("output-length prediction (UELLM's profiler, profiler_ft)")
    lp.add_argument("--length-predictor", default=None, metavar="PATH",
                    help="a predictor folder from 'python -m profiler_ft train': each request "
                         "is annotated with its predicted output-length bucket and length, "
                         "visible to policies and in the X-BanaServe-Predicted-Bucket/-Length "
                         "response headers")
    lp.add_argument("--length-predictor-batch", type=int, default=_L.max_batch,
                    help=f"most requests predicted in one forward pass ({_L.max_batch})")
    lp.add_argument("--length-predictor-wait-ms", type=float, default=_L.max_wait_ms,
                    help="longest a request waits for others to share its prediction batch; "
                         "0: none, requests arriving during a batch form the next one "
                         f"({_L.max_wait_ms} ms)")
    lp.add_argument("--length-predictor-timeout-ms", type=float, default=_L.timeout_ms,
                    help="a request whose prediction is slower than this is dispatched "
                         f"without one ({_L.timeout_ms} ms)")
    lp.add_argument("--length-predictor-threads", type=int, default=_L.threads,
                    help=f"torch threads for prediction in the router ({_L.threads})")
    _add_discovery_arguments(parser)
    _add_batching_arguments(parser)
    _add_rebalance_arguments(parser)
    parser.add_argument("--sidecar", action="store_true",
                        help="also serve the operators' sidecar API from the router: POST "
                             "/v1/plan/placement (HELR), /v1/plan/batches (SLO-ODBS), "
                             "/v1/predict/length (with --length-predictor); see "
                             "python -m router.sidecar --help")
    parser.add_argument("--log-level", default=_D.log_level,
                        choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    try:
        health = HealthConfig(args.health_interval, args.health_timeout,
                              args.health_failure_threshold, args.health_success_threshold,
                              args.health_busy_grace)
        retry = RetryConfig(args.max_retries, args.retry_initial_backoff, args.retry_max_backoff)
        breaker = BreakerConfig(args.breaker_failure_threshold, args.breaker_success_threshold,
                                args.breaker_open_seconds)
        admission = AdmissionConfig(args.max_concurrent_requests, args.max_queued_requests,
                                    args.queue_timeout, args.retry_after)
        length = LengthConfig(
            args.length_predictor, args.length_predictor_batch, args.length_predictor_wait_ms,
            args.length_predictor_timeout_ms, args.length_predictor_threads,
        ) if args.length_predictor else None
        batching = _batching_config(args)
        return RouterConfig(
            workers=tuple(args.workers), prefill=_prefill_workers(args.prefill),
            decode=tuple(u for group in args.decode for u in group),
            prefill_policy=args.prefill_policy, decode_policy=args.decode_policy,
            host=args.host, port=args.port, policy=args.policy,
            load_poll_interval_s=args.load_poll_interval, health=health, retry=retry,
            breaker=breaker, admission=admission, request_timeout_s=args.request_timeout,
            api_key=args.api_key, shutdown_timeout_s=args.shutdown_timeout,
            read_timeout_s=args.read_timeout, tokenizer_path=args.tokenizer,
            log_level=args.log_level, length=length, batching=batching,
            sidecar=args.sidecar, rebalance=_rebalance_config(args),
            discovery=_discovery_config(args))
    except ValueError as exc:
        parser.exit(2, f"router: {exc}\n")


def _add_discovery_arguments(parser: argparse.ArgumentParser) -> None:
    d = parser.add_argument_group(
        "Kubernetes service discovery (alongside or instead of --workers/--prefill/--decode)",
        "The router lists and watches pods by label selector and adds each ready pod "
        "(Running, with a podIP, not terminating, Ready condition True) as the worker "
        "http://{podIP}:{--service-discovery-port}; pods that go away or stop being ready are "
        "drained. The flags match smg's (SGLang's router) in name and meaning. The service "
        "account needs get/list/watch on pods; see docs/service_discovery.md.")
    d.add_argument("--service-discovery", action="store_true",
                   help="enable Kubernetes service discovery (as smg's --service-discovery)")
    for flag, what in (("selector", "worker pods"),
                       ("prefill-selector", "prefill worker pods (prefill/decode mode)"),
                       ("decode-selector", "decode worker pods (prefill/decode mode)")):
        d.add_argument(f"--{flag}", nargs="+", action="extend", default=[],
                       metavar="KEY=VALUE",
                       help=f"label selector of {what}; all pairs must match (as smg's --{flag})")
    d.add_argument("--service-discovery-port", type=int, default=_DC.port, metavar="PORT",
                   help=f"port of the SGLang server in each discovered pod ({_DC.port}, as smg)")
    d.add_argument("--service-discovery-namespace", default=None, metavar="NS",
                   help="namespace to watch (default: every namespace, which needs a "
                        "ClusterRole; as smg)")
    d.add_argument("--k8s-api-url", default=None, metavar="URL",
                   help="Kubernetes API base URL, https or http (e.g. kubectl proxy's "
                        "http://127.0.0.1:8001); default: in-cluster, from "
                        "KUBERNETES_SERVICE_HOST/_PORT and the pod's service account")
    d.add_argument("--k8s-token-file", default=None, metavar="PATH",
                   help="bearer token file, re-read before each request (default: the "
                        "service-account token in-cluster, none with --k8s-api-url)")
    d.add_argument("--k8s-ca-file", default=None, metavar="PATH",
                   help="CA bundle for the API's certificate (default: the service-account "
                        "ca.crt in-cluster, the system CAs with --k8s-api-url)")


def _discovery_config(args: argparse.Namespace) -> DiscoveryConfig | None:
    selectors = {flag: parse_selector(getattr(args, flag.replace("-", "_")), f"--{flag}")
                 for flag in ("selector", "prefill-selector", "decode-selector")}
    if not args.service_discovery:
        given = [f"--{flag}" for flag, pairs in selectors.items() if pairs]
        given += [flag for flag, value in (("--k8s-api-url", args.k8s_api_url),
                                           ("--service-discovery-namespace",
                                            args.service_discovery_namespace)) if value]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --service-discovery")
        return None
    return DiscoveryConfig(
        selector=selectors["selector"], prefill_selector=selectors["prefill-selector"],
        decode_selector=selectors["decode-selector"], port=args.service_discovery_port,
        namespace=args.service_discovery_namespace, api_url=args.k8s_api_url,
        token_file=args.k8s_token_file, ca_file=args.k8s_ca_file)


def _add_batching_arguments(parser: argparse.ArgumentParser) -> None:
    b = parser.add_argument_group(
        "SLO-aware batching (UELLM's SLO-ODBS; see docs/slo_odbs.md)",
        "With --batching, requests wait in the router until a worker has a free slot (at most "
        "--batch-slots-per-worker each); the policy then groups everything waiting into "
        "batches and sends the first batch to the least busy worker. A request's SLO comes "
        "from the body field slo_ms or the X-BanaServe-SLO-Ms header (milliseconds, end to "
        "end), its output length from X-BanaServe-Output-Length, else --length-predictor, "
        "else max_tokens. The worker is told both in custom_params (banaserve_slo_ms, "
        "banaserve_predicted_len) for its own SLO-ODBS queue (--queue-policy on the launcher).")
    b.add_argument("--batching", default="none", choices=["none", *POLICIES],
                   help="none (default): dispatch at once; fcfs, spf (shortest predicted "
                        "first), s3 (S3 length binning), slo-odbs, slo-odbs-code (the original "
                        "code's admission rule)")
    b.add_argument("--batch-window-ms", type=float, default=_BC.window_ms,
                   help=f"longest a request is held for companions ({_BC.window_ms} ms)")
    b.add_argument("--batch-slots-per-worker", type=int, default=_BC.slots_per_worker,
                   help="requests kept running on each worker; match the workers' "
                        f"--max-running-requests ({_BC.slots_per_worker})")
    b.add_argument("--batch-max-size", type=int, default=_BB.max_batch,
                   help=f"most requests in one batch ({_BB.max_batch})")
    b.add_argument("--default-slo-ms", type=float, default=_BC.default_slo_ms,
                   help=f"SLO of a request that names none ({_BC.default_slo_ms:.0f} ms)")
    b.add_argument("--slo-odbs-w1", type=float, default=_BB.w1,
                   help=f"weight of the latency term ({_BB.w1})")
    b.add_argument("--slo-odbs-w2", type=float, default=_BB.w2,
                   help=f"weight of the length-spread (KV waste) term ({_BB.w2})")
    b.add_argument("--slo-odbs-threshold", type=float, default=_BB.threshold,
                   help=f"bound on w1*T_l + w2*T_o for a batch to grow ({_BB.threshold})")
    b.add_argument("--slo-step-ms", type=float, default=_BS.step_s * 1000,
                   help="service model: ms per decode step of one request on a worker "
                        f"({_BS.step_s * 1000:.0f})")
    b.add_argument("--slo-prefill-tokens-per-s", type=float, default=_BS.prefill_tokens_per_s,
                   help=f"service model: prompt tokens prefilled per second "
                        f"({_BS.prefill_tokens_per_s:.0f})")


def _batching_config(args: argparse.Namespace) -> BatcherConfig | None:
    if args.batching == "none":
        return None
    service = ServiceModel(step_s=args.slo_step_ms / 1000.0,
                           prefill_tokens_per_s=args.slo_prefill_tokens_per_s)
    batching = BatchingConfig(policy=args.batching, max_batch=args.batch_max_size,
                              w1=args.slo_odbs_w1, w2=args.slo_odbs_w2,
                              threshold=args.slo_odbs_threshold, service=service)
    return BatcherConfig(batching=batching, window_ms=args.batch_window_ms,
                         slots_per_worker=args.batch_slots_per_worker,
                         default_slo_ms=args.default_slo_ms)


def _add_rebalance_arguments(parser: argparse.ArgumentParser) -> None:
    r = parser.add_argument_group(
        "dynamic rebalancing (BanaServe's decision flow; see docs/rebalancer.md)",
        "With --rebalance, every period the router reads each worker's compute and KV "
        "utilisation (/v1/loads, smoothed) and GET /banaserve/status, and migrates layers "
        "(sustained compute imbalance), offloads attention heads' KV (memory pressure), or undoes "
        "either, through the workers' /banaserve/ control API. Decisions are logged with their "
        "reasons and shown by GET /rebalance. Workers need the migration patches and layer "
        "hosts (python -m runtime_patches.launch --layer-host ...).")
    r.add_argument("--rebalance", action="store_true",
                   help="run the rebalancing controller (not in prefill/decode mode)")
    r.add_argument("--rebalance-dry-run", action="store_true",
                   help="decide and log, but send no control request")
    for flag, name, kind, help_text in (
            ("period", "period_s", float, "seconds between decision rounds"),
            ("ewma-alpha", "ewma_alpha", float, "weight of the newest reading in the smoothed "
             "utilisations"),
            ("compute-gap", "compute_gap", float, "U_c(hot) - U_c(cold) above which layers move"),
            ("compute-windows", "compute_windows", int, "consecutive periods the compute gap "
             "must last"),
            ("layer-budget-ms", "layer_budget_ms", float, "longest estimated layer migration; "
             "fewer layers are moved to fit"),
            ("transfer-bytes-per-s", "transfer_bytes_per_s", float, "assumed worker-to-host "
             "transfer rate for the estimate"),
            ("overhead-ms", "overhead_ms", float, "fixed cost added to every estimate"),
            ("max-layer-fraction", "max_layer_fraction", float, "most of a worker's layers "
             "migrated at once, as a fraction of all"),
            ("kv-high", "kv_high", float, "U_kv above which a worker offloads heads"),
            ("kv-low", "kv_low", float, "U_kv below which a worker may receive heads; projected "
             "U_kv below which heads are recalled"),
            ("head-target", "head_target_util", float, "U_kv a head offload aims for"),
            ("revert-gap", "revert_gap", float, "|U_c gap| below which migrated layers come back"),
            ("revert-windows", "revert_windows", int, "consecutive periods before a restore or "
             "recall"),
            ("cooldown", "cooldown_s", float, "seconds between two actions on the same worker"),
            ("status-timeout", "status_timeout_s", float, "timeout of GET /banaserve/status, s"),
            ("action-timeout", "action_timeout_s", float, "timeout of a control POST, s")):
        default = getattr(_RB, name)
        metavar = "N" if kind is int else "MS" if name.endswith("_ms") else \
            "S" if name.endswith("_s") else "X"
        r.add_argument(f"--rebalance-{flag}", dest=f"rebalance_{name}", type=kind,
                       default=default, metavar=metavar, help=f"{help_text} ({default:g})")


def _rebalance_config(args: argparse.Namespace) -> RebalanceConfig | None:
    if not args.rebalance:
        return None
    names = [f.name for f in dataclasses.fields(RebalanceConfig)
             if f.name != "dry_run" and hasattr(args, f"rebalance_{f.name}")]
    return RebalanceConfig(dry_run=args.rebalance_dry_run,
                           **{n: getattr(args, f"rebalance_{n}") for n in names})


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
