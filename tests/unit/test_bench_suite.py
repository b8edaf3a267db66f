"""The evaluation suite's logic without processes: system configs (what a cluster may combine),
their YAML, the ``random`` workload, the plot of several systems, and how ``scripts.bench.agree``
reads bench_serving's per-request details and compares the two tools."""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import pytest

from scripts.bench.agree import compare, ours_value
from scripts.bench.replay.bench_serving import argv as bench_serving_argv
from scripts.bench.replay.bench_serving import results_from_details
from scripts.bench.replay.cluster import ClusterConfig
from scripts.bench.replay.metrics import SLO, summarise
from scripts.bench.replay.report import plot
from scripts.bench.replay.run import load_config
from scripts.bench.replay.workload import WorkloadConfig, build

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "bench", "configs")


def test_cluster_configs_refuse_combinations_that_cannot_run() -> None:
    assert ClusterConfig().describe() == "banaserve cost_aware, 2 workers"
    assert ClusterConfig(pd=(1, 2)).num_workers == 3
    full = ClusterConfig(layer_hosts=True, rebalance=True, batching="slo-odbs")
    assert full.describe() == ("banaserve cost_aware, 2 workers + layer hosts, rebalancer, "
                               "batching slo-odbs")
    for bad, match in ((dict(router="vllm"), "cluster.router"),
                       (dict(workers=0), "cluster.workers"),
                       (dict(pd=(1, 0)), "cluster.pd"),
                       (dict(pd=(1, 1), kvstore=True), "cluster.pd"),
                       (dict(router="smg", kvstore=True), "BanaServe features"),
                       (dict(rebalance=True), "needs layer_hosts"),
                       (dict(kvstore=True, layer_hosts=True), "cannot be combined"),
                       (dict(kvstore_layerwise=True), "needs kvstore"),
                       (dict(batching="lifo"), "cluster.batching")):
        with pytest.raises(ValueError, match=match):
            ClusterConfig(**bad)


def test_systems_parse_from_yaml_with_lists_as_tuples(tmp_path: Any) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("""systems:
  a: {policy: round_robin, worker_args: [--chunked-prefill-size, "256"]}
  b: {pd: [1, 1]}
repeats: 2
""")
    cfg = load_config(str(path))
    assert cfg.systems is not None and list(cfg.systems) == ["a", "b"]
    assert cfg.systems["a"].worker_args == ("--chunked-prefill-size", "256")
    assert cfg.systems["b"].pd == (1, 1) and cfg.repeats == 2
    path.write_text("systems:\n  a: {polcy: x}\n")
    with pytest.raises(ValueError, match=r"systems.a: unknown keys \['polcy'\]"):
        load_config(str(path))
    path.write_text("systems:\n  a: {router: smg, rebalance: true}\n")
    with pytest.raises(ValueError, match="BanaServe features"):
        load_config(str(path))
    path.write_text("systems: {}\n")
    with pytest.raises(ValueError, match="at least one system"):
        load_config(str(path))


def test_the_shipped_configs_parse() -> None:
    names = sorted(n for n in os.listdir(CONFIGS) if n.endswith(".yaml"))
    assert {"compare_azure_smollm2.yaml", "compare_mooncake_smollm2.yaml",
            "slo_odbs_smollm2.yaml"} <= set(names)
    for name in names:
        load_config(os.path.join(CONFIGS, name))


def test_random_workload_has_fixed_lengths_and_burst_or_poisson_arrivals() -> None:
    burst = build(WorkloadConfig(source="random", num_requests=5, max_input_tokens=30,
                                 max_output_tokens=7))
    assert [r.at_s for r in burst.requests] == [0.0] * 5
    assert {r.prompt_tokens for r in burst.requests} == {30}
    assert {r.output_tokens for r in burst.requests} == {7}
    assert all(len(r.prompt.split()) == 30 for r in burst.requests)
    assert len({r.prompt for r in burst.requests}) == 5
    paced = build(WorkloadConfig(source="random", num_requests=5, rate=2.0))
    times = [r.at_s for r in paced.requests]
    assert times == sorted(times) and times[-1] > 0
    assert paced.description["arrivals"] == "poisson 2.0/s"


def test_shared_prefix_workload_repeats_each_groups_prefix_and_nothing_else() -> None:
    wl = build(WorkloadConfig(source="shared_prefix", num_requests=12, groups=3,
                              prefix_tokens=20, max_input_tokens=30, max_output_tokens=5,
                              rate=1.0))
    words = [r.prompt.split() for r in wl.requests]
    assert all(len(w) == 30 for w in words)
    prefixes = collections.Counter(" ".join(w[:20]) for w in words)
    assert sorted(prefixes.values()) == [4, 4, 4]  # three groups, four requests each
    assert len({" ".join(w[20:]) for w in words}) == 12  # every question its own
    groups = [" ".join(w[:20]) for w in words]
    assert groups != sorted(groups, key=groups.index)  # the groups take turns, not in runs
    assert wl.description["groups"] == 3 and wl.description["arrivals"] == "poisson 1.0/s"
    with pytest.raises(ValueError, match="prefix_tokens < max_input_tokens"):
        WorkloadConfig(source="shared_prefix", prefix_tokens=30, max_input_tokens=30)


def _run(system: str, rate: float | None, tput: float) -> dict[str, Any]:
    return {"label": f"{system} {rate}", "system": system, "rate": rate, "requests": [
        {"ok": True, "ttft": 0.1 * (i + 1), "tpot": 0.02 * (i + 1)} for i in range(4)],
        "summary": {"output_tokens_per_s": tput, "goodput_share": 0.5}, "load": []}


def test_a_comparison_of_systems_plots(tmp_path: Any) -> None:
    runs = [_run(s, r, t) for s, t in (("a", 10.0), ("b", 12.0)) for r in (None, 2.0)]
    out = tmp_path / "p.png"
    plot({"name": "cmp", "runs": runs}, str(out))
    assert out.stat().st_size > 10_000


DETAILS = {"ttfts": [0.1, 0.2, 0.0], "itls": [[0.01, 0.03], [0.02, 0.02], []],
           "output_lens": [3, 3, 0], "input_lens": [8, 8, 8], "errors": ["", "", "boom"],
           "duration": 2.0}


def test_bench_serving_details_become_our_results() -> None:
    ok1, ok2, failed = results_from_details(DETAILS)
    assert ok1.ok and ok1.e2e == pytest.approx(0.14) and ok1.tpot == pytest.approx(0.02)
    assert ok2.ttft == 0.2 and ok2.prompt_tokens == 8
    assert not failed.ok and failed.error == "boom"
    s = summarise([ok1, ok2, failed], 2.0, SLO())
    assert s["completed"] == 2 and s["output_tokens_per_s"] == 3.0
    assert ours_value(s, "ttft_s", "p50") == pytest.approx(150.0)
    assert ours_value(s, "output_tokens_per_s", None) == 3.0


def test_compare_reports_the_gap_the_spread_and_the_definitions_check() -> None:
    def ours(ttft: float) -> dict[str, Any]:
        stats = {"p50": ttft, "p99": ttft, "mean": ttft}
        return {"summary": {"ttft_s": stats, "tpot_s": stats, "itl_s": stats, "e2e_s": stats,
                            "output_tokens_per_s": 10.0}}

    def theirs(ttft_ms: float) -> dict[str, Any]:
        keys = ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
                "median_itl_ms", "median_e2e_latency_ms")
        record: dict[str, Any] = {k: ttft_ms for k in keys}
        record["output_throughput"] = 10.0
        record["_recomputed"] = ours(ttft_ms / 1000 * 1.01)["summary"]
        return record

    rows = compare([(ours(0.100), theirs(110.0)), (ours(0.120), theirs(90.0))])
    ttft = rows["ttft_s.p50"]
    assert ttft["ours_mean"] == pytest.approx(110.0)
    assert ttft["bench_serving_mean"] == pytest.approx(100.0)
    assert ttft["gap_pct"] == pytest.approx(10.0)
    assert ttft["ours_spread"] == pytest.approx(100 * 10 / 110)
    assert ttft["bench_serving_spread"] == pytest.approx(10.0)
    assert ttft["definitions_max_diff_pct"] == pytest.approx(1.0)
    assert rows["output_tokens_per_s"]["gap_pct"] == pytest.approx(0.0)
    json.dumps(rows)


def test_bench_serving_runs_as_shipped_with_our_dataset_arguments() -> None:
    cmd = bench_serving_argv("http://h:1", "m", "/tok", "chat", 2.0, 7, 2,
                             ["--dataset-name", "generated-shared-prefix"], "/o.jsonl")
    assert cmd[1:5] == ["-m", "sglang.bench_serving", "--backend", "sglang-oai-chat"]
    joined = " ".join(cmd)
    for part in ("--base-url http://h:1", "--dataset-name generated-shared-prefix",
                 "--request-rate 2.0", "--seed 7", "--warmup-requests 2", "--output-details"):
        assert part in joined
    assert "--request-rate inf" in " ".join(
        bench_serving_argv("u", "m", "t", "completions", None, 0, 0, [], "o"))
    assert "sglang-oai" in bench_serving_argv("u", "m", "t", "completions", 1.0, 0, 0, [], "o")


def test_a_bench_serving_config_needs_its_dataset_and_a_tokenizer(tmp_path: Any) -> None:
    def cfg(body: str) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(body)
        return str(path)

    good = load_config(cfg("client: bench_serving\ntarget: {tokenizer: smollm2}\n"
                           "bench_serving_args: [--dataset-name, random-ids, --num-prompts, 4]\n"))
    assert good.bench_serving_args == ("--dataset-name", "random-ids", "--num-prompts", "4")
    with pytest.raises(ValueError, match="bench_serving_args"):
        load_config(cfg("client: bench_serving\ntarget: {tokenizer: smollm2}\n"))
    with pytest.raises(ValueError, match="tokenizer"):
        load_config(cfg("client: bench_serving\nbench_serving_args: [x]\n"))
    with pytest.raises(ValueError, match="client"):
        load_config(cfg("client: locust\n"))
