"""The simulator's command line and calibration check (scripts/sim/__main__.py, calibrate.py,
experiment.py): measured-vs-predicted comparison, exit codes, a tiny comparison config end to
end (JSON and PNG), one-line errors for bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from scripts.sim.__main__ import main
from scripts.sim.calibrate import compare

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.0000000,200,20
2023-11-16 18:15:52.0000000,100,10
"""


def summary(ttft_p50: float, tput: float) -> dict[str, Any]:
    return {"ttft_s": {"p50": ttft_p50}, "output_tokens_per_s": tput}


def test_compare_reports_relative_errors_and_the_verdict() -> None:
    out = compare(summary(0.2, 40.0), summary(0.22, 38.0), tolerance=0.15)
    assert out["ok"]
    assert out["metrics"]["ttft_p50_s"]["error"] == pytest.approx(0.1)
    assert out["metrics"]["output_tokens_per_s"]["error"] == pytest.approx(-0.05)
    bad = compare(summary(0.2, 40.0), summary(0.3, 40.0), tolerance=0.15)
    assert not bad["ok"] and not bad["metrics"]["ttft_p50_s"]["ok"]
    assert bad["metrics"]["output_tokens_per_s"]["ok"]
    missing = compare(summary(0.2, 40.0), {"ttft_s": {"p50": None}}, tolerance=0.15)
    assert not missing["ok"]


def measured_file(tmp_path: Path) -> str:
    """A crafted replay result: 6 lone requests, each measured exactly as the profile says."""
    requests = [{"index": i, "sent_at": 2.0 * i, "ok": True, "prompt_tokens": 100,
                 "output_tokens": 10, "ttft": 0.1, "e2e": 0.5} for i in range(6)]
    run = {"label": "crafted", "requests": requests,
           "summary": {"ttft_s": {"p50": 0.1}, "output_tokens_per_s": 60 / 10.5}}
    path = tmp_path / "measured.json"
    path.write_text(json.dumps({"config": {"slo": {"ttft_ms": 3000, "tpot_ms": 250}},
                                "runs": [run]}))
    return str(path)


def profile_file(tmp_path: Path, prefill_per_token_s: float) -> str:
    data = {"name": "crafted", "num_layers": 2, "prefill_overhead_s": 0.0,
            "prefill_per_token_s": prefill_per_token_s, "prefill_attn_s": 0.0,
            "decode_overhead_s": 0.04, "decode_per_seq_s": 0.0, "decode_per_kv_token_s": 0.0,
            "kv_bytes_per_token": 10, "layer_weight_bytes": 10, "activation_bytes_per_token": 1,
            "num_kv_heads": 1, "link_bytes_per_s": 1e9, "store_bytes_per_s": 1e9,
            "kv_pool_tokens": 4096, "max_running_requests": 8, "chunked_prefill_tokens": 4096,
            "overlap_schedule": False}
    path = tmp_path / f"profile-{prefill_per_token_s}.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_calibrate_passes_and_fails_on_the_tolerance(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    measured, out = measured_file(tmp_path), str(tmp_path / "cal.json")
    args = ["calibrate", "--measured", measured, "--shared-prefix-tokens", "0", "--seeds", "2",
            "--out", out]
    # prefill of 100 tokens at 1 ms each = 0.1 s, 9 decode steps of 40 ms: exactly as measured
    assert main([*args, "--profile", profile_file(tmp_path, 0.001)]) == 0
    result = json.loads(Path(out).read_text())
    assert result["ok"] and result["rows"][0]["metrics"]["ttft_p50_s"]["error"] == \
        pytest.approx(0.0, abs=1e-6)
    # twice as slow a prefill predicts TTFT 0.2 s: +100%, outside 15%
    assert main([*args, "--profile", profile_file(tmp_path, 0.002)]) == 1
    assert "OUTSIDE TOLERANCE" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "--measured", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not found" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: llama13b_a100\ninstances: [2]\nbaseline: x\nworkloads: {}\n"
                   "systems: {a: {policy: round_robin, colour: red}}\n")
    assert main(["run", str(bad)]) == 2
    assert "systems.a: unknown field(s) colour" in capsys.readouterr().err
    assert main(["calibrate", "--profile", "no_such_profile"]) == 2


def test_run_writes_json_and_png(tmp_path: Path) -> None:
    trace = tmp_path / "azure.csv"
    trace.write_text(AZURE)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
name: tiny
profile: llama13b_a100
instances: [2]
baseline: rr
latency_reference: pd
workloads:
  azure: {{source: azure_conv, path: {trace}, rates_per_instance: [1.0],
           requests_per_instance: 2}}
systems:
  rr: {{policy: round_robin}}
  pd: {{policy: load_aware, prefill_fraction: 0.5}}
  bana: {{policy: load_aware, global_store: true, rebalance: {{}}}}
""")
    out = tmp_path / "out.json"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {c["system"] for c in result["cells"]} == {"rr", "pd", "bana"}
    rr = next(r for r in result["comparison"] if r["system"] == "rr")
    assert rr["throughput_vs_baseline"] == pytest.approx(1.0)
    assert os.path.getsize(tmp_path / "out.png") > 0
