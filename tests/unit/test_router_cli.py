"""`python -m router`: the command line builds the typed config; bad values exit with one line."""

from __future__ import annotations

import pytest

from router.__main__ import parse_args
from router.config import HealthConfig, RouterConfig


def test_defaults_match_the_config_dataclasses() -> None:
    cfg = parse_args(["--workers", "http://127.0.0.1:31000"])
    assert cfg.workers == ("http://127.0.0.1:31000",)
    defaults = RouterConfig(workers=cfg.workers)
    assert cfg.health == defaults.health == HealthConfig()
    assert cfg.retry == defaults.retry and cfg.breaker == defaults.breaker
    assert cfg.admission == defaults.admission and cfg.policy == defaults.policy == "load_aware"


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
