"""`python -m router`: the command line builds the typed config; bad values exit with one line."""

from __future__ import annotations

import pytest

from router.__main__ import build_parser, parse_args
from router.admission import AdmissionConfig
from router.batching.config import BatcherConfig
from router.batching.slo_odbs import BatchingConfig, ServiceModel
from router.breaker import BreakerConfig
from router.cli_fields import flags
from router.config import (
    DiscoveryConfig,
    HealthConfig,
    PrefillWorker,
    RetryConfig,
    RouterConfig,
)
from router.length import LengthConfig
from router.rebalance.config import RebalanceConfig


def test_defaults_match_the_config_dataclasses() -> None:
    cfg = parse_args(["--workers", "http://127.0.0.1:31000"])
    assert cfg.workers == ("http://127.0.0.1:31000",)
    defaults = RouterConfig(workers=cfg.workers)
    assert cfg.health == defaults.health == HealthConfig()
    assert cfg.retry == defaults.retry and cfg.breaker == defaults.breaker
    assert cfg.admission == defaults.admission and cfg.policy == defaults.policy == "cost_aware"


def test_every_health_flag_reaches_the_config() -> None:
    cfg = parse_args(["--workers", "http://a:1", "--health-interval", "0.5",
                      "--health-timeout", "1.5", "--health-failure-threshold", "4",
                      "--health-success-threshold", "3", "--health-busy-grace", "12"])
    assert cfg.health == HealthConfig(interval_s=0.5, timeout_s=1.5, failure_threshold=4,
                                      success_threshold=3, busy_grace_s=12.0)


def test_prefill_decode_flags() -> None:
    cfg = parse_args(["--prefill", "http://p:1", "8998", "--prefill", "http://q:2",
                      "--decode", "http://d:3", "--prefill-policy", "round_robin"])
    assert [(p.url, p.bootstrap_port) for p in cfg.prefill] == [("http://p:1", 8998),
                                                                 ("http://q:2", None)]
    assert cfg.decode == ("http://d:3",) and cfg.prefill_policy == "round_robin"


@pytest.mark.parametrize("argv", [["--workers", "http://a:1", "--health-busy-grace", "-1"],
                                  ["--workers", "http://a:1", "--health-timeout", "0"]])
def test_bad_values_exit_with_one_line(argv: list[str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("router: ") and "\n" not in err


# -- the CLI is built from the config fields (router.cli_fields): same argv, same config --------
# The expected configs below were written down from the hand-written parser this replaced.
A, B, C, D, E = ("http://127.0.0.1:31000", "http://127.0.0.1:31001", "http://127.0.0.1:31002",
                 "http://127.0.0.1:31003", "http://127.0.0.1:31004")
_REBALANCE_ALL = [
    "--rebalance", "--rebalance-dry-run", "--rebalance-period", "0.5",
    "--rebalance-ewma-alpha", "0.5", "--rebalance-compute-gap", "0.3",
    "--rebalance-compute-windows", "4", "--rebalance-layer-budget-ms", "50",
    "--rebalance-transfer-bytes-per-s", "2e9", "--rebalance-overhead-ms", "5",
    "--rebalance-max-layer-fraction", "0.5", "--rebalance-kv-high", "0.9",
    "--rebalance-kv-low", "0.5", "--rebalance-head-target", "0.8",
    "--rebalance-revert-gap", "0.05", "--rebalance-revert-windows", "6",
    "--rebalance-cooldown", "2", "--rebalance-status-timeout", "1",
    "--rebalance-action-timeout", "30"]
_EVERY_FLAG = [
    "--workers", A, "127.0.0.1:31001/", "--host", "0.0.0.0", "--port", "30001",
    "--policy", "round_robin", "--load-poll-interval", "0.25",
    "--health-interval", "0.5", "--health-timeout", "1.5", "--health-failure-threshold", "4",
    "--health-success-threshold", "3", "--health-busy-grace", "12",
    "--max-retries", "5", "--retry-initial-backoff", "0.1", "--retry-max-backoff", "2",
    "--breaker-failure-threshold", "7", "--breaker-open-seconds", "3.5",
    "--breaker-success-threshold", "4", "--max-concurrent-requests", "16",
    "--max-queued-requests", "32", "--queue-timeout", "5", "--retry-after", "3",
    "--request-timeout", "90", "--api-key", "sekrit", "--shutdown-timeout", "7",
    "--read-timeout", "60", "--tokenizer", "/models/tok",
    "--length-predictor", "/models/pred", "--length-predictor-batch", "8",
    "--length-predictor-wait-ms", "2.5", "--length-predictor-timeout-ms", "100",
    "--length-predictor-threads", "2",
    "--service-discovery", "--selector", "app=sglang tier=gpu", "--selector", "zone=a",
    "--service-discovery-port", "31000", "--service-discovery-namespace", "serving",
    "--k8s-api-url", "http://127.0.0.1:8001", "--k8s-token-file", "/tok",
    "--k8s-ca-file", "/ca.crt",
    "--batching", "spf", "--batch-window-ms", "20", "--batch-slots-per-worker", "4",
    "--batch-max-size", "6", "--default-slo-ms", "5000", "--slo-odbs-w1", "2",
    "--slo-odbs-w2", "0.25", "--slo-odbs-threshold", "1.5", "--slo-step-ms", "25",
    "--slo-prefill-tokens-per-s", "4000", *_REBALANCE_ALL, "--sidecar", "--log-level", "debug"]

CASES: dict[str, tuple[list[str], RouterConfig]] = {
    "defaults": (["--workers", A], RouterConfig(
        workers=(A,), prefill=(), decode=(), prefill_policy=None, decode_policy=None,
        host="127.0.0.1", port=30000, policy="cost_aware", load_poll_interval_s=0.5,
        health=HealthConfig(interval_s=2.0, timeout_s=3.0, failure_threshold=2,
                            success_threshold=1, busy_grace_s=30.0),
        retry=RetryConfig(max_retries=2, initial_backoff_s=0.02, max_backoff_s=1.0, jitter=0.5),
        breaker=BreakerConfig(failure_threshold=5, success_threshold=2, open_s=10.0,
                              half_open_max=1),
        admission=AdmissionConfig(max_concurrent=0, max_queued=256, queue_timeout_s=30.0,
                                  retry_after_s=1),
        request_timeout_s=1800.0, api_key=None, shutdown_timeout_s=30.0, connect_timeout_s=5.0,
        read_timeout_s=600.0, tokenizer_path=None, log_level="info", length=None,
        sidecar=False, batching=None, rebalance=None, discovery=None)),
    "every flag": (_EVERY_FLAG, RouterConfig(
        workers=(A, B), host="0.0.0.0", port=30001, policy="round_robin",
        load_poll_interval_s=0.25,
        health=HealthConfig(interval_s=0.5, timeout_s=1.5, failure_threshold=4,
                            success_threshold=3, busy_grace_s=12.0),
        retry=RetryConfig(max_retries=5, initial_backoff_s=0.1, max_backoff_s=2.0),
        breaker=BreakerConfig(failure_threshold=7, success_threshold=4, open_s=3.5),
        admission=AdmissionConfig(max_concurrent=16, max_queued=32, queue_timeout_s=5.0,
                                  retry_after_s=3),
        request_timeout_s=90.0, api_key="sekrit", shutdown_timeout_s=7.0, read_timeout_s=60.0,
        tokenizer_path="/models/tok", log_level="debug",
        length=LengthConfig(path="/models/pred", max_batch=8, max_wait_ms=2.5, timeout_ms=100.0,
                            threads=2),
        sidecar=True,
        batching=BatcherConfig(
            batching=BatchingConfig(policy="spf", max_batch=6, w1=2.0, w2=0.25, threshold=1.5,
                                    service=ServiceModel(step_s=0.025,
                                                         prefill_tokens_per_s=4000.0)),
            window_ms=20.0, slots_per_worker=4, default_slo_ms=5000.0),
        rebalance=RebalanceConfig(
            period_s=0.5, ewma_alpha=0.5, compute_gap=0.3, compute_windows=4,
            layer_budget_ms=50.0, transfer_bytes_per_s=2e9, overhead_ms=5.0,
            max_layer_fraction=0.5, kv_high=0.9, kv_low=0.5, head_target_util=0.8,
            revert_gap=0.05, revert_windows=6, cooldown_s=2.0, status_timeout_s=1.0,
            action_timeout_s=30.0, dry_run=True),
        discovery=DiscoveryConfig(
            selector=(("app", "sglang"), ("tier", "gpu"), ("zone", "a")), port=31000,
            namespace="serving", api_url="http://127.0.0.1:8001", token_file="/tok",
            ca_file="/ca.crt"))),
    "prefill/decode": (
        ["--prefill", A, "8998", "--prefill", B, "--decode", C, D, "--decode", E,
         "--prefill-policy", "round_robin", "--decode-policy", "random"],
        RouterConfig(prefill=(PrefillWorker(A, 8998), PrefillWorker(B, None)), decode=(C, D, E),
                     prefill_policy="round_robin", decode_policy="random")),
    "prefill/decode by discovery": (
        ["--service-discovery", "--prefill-selector", "role=prefill", "--decode-selector",
         "role=decode", "app=x"],
        RouterConfig(discovery=DiscoveryConfig(
            prefill_selector=(("role", "prefill"),),
            decode_selector=(("role", "decode"), ("app", "x"))))),
    "batching defaults": (["--workers", A, "--batching", "slo-odbs-code"], RouterConfig(
        workers=(A,), batching=BatcherConfig(
            batching=BatchingConfig(policy="slo-odbs-code", max_batch=8, w1=1.0, w2=0.5,
                                    threshold=1.0, service=ServiceModel(
                                        step_s=0.02, prefill_tokens_per_s=2000.0)),
            window_ms=50.0, slots_per_worker=8, default_slo_ms=30000.0))),
    "batching options": (
        ["--workers", A, "--batching", "fcfs", "--slo-step-ms", "30", "--batch-max-size", "3"],
        RouterConfig(workers=(A,), batching=BatcherConfig(batching=BatchingConfig(
            policy="fcfs", max_batch=3, service=ServiceModel(step_s=0.03))))),
    "rebalance options": (
        ["--workers", A, "--rebalance", "--rebalance-period", "0.5", "--rebalance-compute-gap",
         "0.3", "--rebalance-compute-windows", "4", "--rebalance-cooldown", "2"],
        RouterConfig(workers=(A,), rebalance=RebalanceConfig(
            period_s=0.5, ewma_alpha=0.3, compute_gap=0.3, compute_windows=4,
            layer_budget_ms=100.0, transfer_bytes_per_s=1e9, overhead_ms=10.0,
            max_layer_fraction=0.25, kv_high=0.85, kv_low=0.6, head_target_util=0.7,
            revert_gap=0.1, revert_windows=5, cooldown_s=2.0, status_timeout_s=5.0,
            action_timeout_s=120.0, max_recent=50, dry_run=False))),
    "empty predictor path means none": (["--workers", A, "--length-predictor", ""],
                                        RouterConfig(workers=(A,))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_argv_gives_the_same_config_as_the_hand_written_parser(
        case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BANASERVE_API_KEY", raising=False)
    argv, expected = CASES[case]
    assert parse_args(argv) == expected


def test_api_key_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANASERVE_API_KEY", "from-env")
    assert parse_args(["--workers", A]).api_key == "from-env"
    assert parse_args(["--workers", A, "--api-key", "flag"]).api_key == "flag"


ERRORS: dict[str, tuple[list[str], str]] = {
    "prefill takes two": (["--prefill", A, "1", "2", "--decode", B],
                          f"--prefill takes URL [BOOTSTRAP_PORT], got {A} 1 2"),
    "bootstrap port": (["--prefill", A, "x", "--decode", B],
                       "--prefill bootstrap port 'x' is not a number"),
    "selectors need discovery": (
        ["--workers", A, "--selector", "app=x", "--k8s-api-url", "http://h:1",
         "--service-discovery-namespace", "ns"],
        "--selector, --k8s-api-url, --service-discovery-namespace: only with "
        "--service-discovery"),
    "bad selector": (["--workers", A, "--selector", "appx"],
                     "--selector: 'appx' is not KEY=VALUE"),
    "discovery needs a selector": (
        ["--service-discovery"], "DiscoveryConfig.selector: --service-discovery needs "
        "--selector (or --prefill-selector/--decode-selector)"),
    "batching in pd": (["--prefill", A, "--decode", B, "--batching", "fcfs"],
                       "RouterConfig.batching: --batching is not supported in prefill/decode "
                       "mode yet; use it with --workers"),
    "rebalance kv-low": (["--workers", A, "--rebalance", "--rebalance-kv-low", "0.9"],
                         "RebalanceConfig.kv_low: must be in (0, kv_high=0.85) with "
                         "kv_high <= 1 (got 0.9)"),
    "slots": (["--workers", A, "--batching", "fcfs", "--batch-slots-per-worker", "0"],
              "BatcherConfig.slots_per_worker: must be >= 1, got 0"),
    "step": (["--workers", A, "--batching", "fcfs", "--slo-step-ms", "0"],
             "ServiceModel: step_s and prefill_tokens_per_s must be > 0 and batch_slowdown >= 0,"
             " got ServiceModel(step_s=0.0, prefill_tokens_per_s=2000.0, batch_slowdown=0.1)"),
    "breaker": (["--workers", A, "--breaker-open-seconds", "0"],
                "BreakerConfig.open_s: 0.0 must be > 0"),
    "admission": (["--workers", A, "--queue-timeout", "0"],
                  "AdmissionConfig.queue_timeout_s: 0.0 <= 0"),
    "length": (["--workers", A, "--length-predictor", "p", "--length-predictor-batch", "0"],
               "LengthConfig.max_batch: must be >= 1, got 0"),
    "no workers": ([], "RouterConfig.workers: at least one worker URL is required "
                       "(or --service-discovery)"),
    "port": (["--workers", A, "--port", "70000"], "RouterConfig.port: 70000 is not a TCP port"),
    "of two bad values, the same one": (
        ["--prefill", A, "x", "--decode", B, "--selector", "a=b"],
        "--prefill bootstrap port 'x' is not a number"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_values_exit_with_the_same_line(case: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    argv, message = ERRORS[case]
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"router: {message}\n"


def test_argparse_errors_still_name_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in ((["--batching", "bogus"], "argument --batching: invalid choice: "
                           "'bogus' (choose from 'none', 'fcfs', 'spf', 's3', 'slo-odbs', "
                           "'slo-odbs-code')"),
                          (["--port", "x"], "argument --port: invalid int value: 'x'")):
        with pytest.raises(SystemExit) as exc:
            parse_args(["--workers", A, *argv])
        assert exc.value.code == 2
        assert capsys.readouterr().err.endswith(f"python -m router: error: {message}\n")


def test_every_config_flag_is_on_the_command_line_and_nothing_else() -> None:
    parser = build_parser()
    options = {s for action in parser._actions for s in action.option_strings}
    declared = {spec.name for cls in (
        RouterConfig, HealthConfig, RetryConfig, BreakerConfig, AdmissionConfig, LengthConfig,
        DiscoveryConfig, BatcherConfig, BatchingConfig, ServiceModel, RebalanceConfig)
        for spec in flags(cls).values()}
    assert options == declared | {"-h", "--help"}


def test_help_shows_the_field_defaults() -> None:
    text = " ".join(build_parser().format_help().split())
    for phrase in ("seconds between health checks (2.0)", "listen address (default 127.0.0.1)",
                   "SLO of a request that names none (30000 ms)",
                   "service model: ms per decode step of one request on a worker (20)",
                   "seconds between decision rounds (1)",
                   "assumed worker-to-host transfer rate for the estimate (1e+09)",
                   "one of cache_aware,", "--rebalance-transfer-bytes-per-s S"):
        assert phrase in text, phrase
