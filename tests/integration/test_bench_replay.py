"""The replay benchmark's command line against the real router and two tiny-model SGLang CPU
workers: an Azure-format trace and a Mooncake-format trace (written here, in the traces'
formats), exact prompt lengths from the model's tokenizer, every request answered with exactly
its output length, the router's per-worker load sampled, JSON and PNG written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.integration.cluster import RouterProcess

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(config: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scripts.bench", "run", config], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_trace_replay_through_the_router(router: RouterProcess, tmp_path: Any) -> None:
    azure = tmp_path / "azure.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{40 + i:02d}.0000000,{200 + 40 * i},{8 + 4 * i}\n"
        for i in range(6)))
    mooncake = tmp_path / "mc.jsonl"
    mooncake.write_text("\n".join(json.dumps(
        {"timestamp": 200 * i, "input_length": 1024 + 512 * (i % 2), "output_length": 12,
         "hash_ids": [0, 1, 100 + i] if i % 2 else [0, 100 + i]}) for i in range(6)))
    out = tmp_path / "r.json"
    config = tmp_path / "c.yaml"
    config.write_text(f"""name: replay-test
target: {{url: {router.url}, api: completions, tokenizer: tiny}}
workload: {{source: azure_conv, path: {azure}, num_requests: 6, time_scale: 0.25}}
rates: [null, 4.0]
slo: {{ttft_ms: 10000, tpot_ms: 1000}}
load_interval_s: 0.2
out: {out}
""")
    done = _run(str(config))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "replay-test [trace x0.25]: 6/6 ok" in done.stdout
    result = json.loads(out.read_text())
    for run in result["runs"]:
        requests = run["requests"]
        assert all(r["ok"] for r in requests), requests
        assert [r["output_tokens"] for r in requests] == [8, 12, 16, 20, 24, 28]
        # exact lengths from the tokenizer (plus what the server adds, the same for each)
        added = requests[0]["prompt_tokens"] - 200
        assert 0 <= added <= 2
        assert [r["prompt_tokens"] - added for r in requests] == [200 + 40 * i for i in range(6)]
        assert run["summary"]["goodput_share"] == 1.0
        assert run["summary"]["ttft_s"]["p50"] > 0 and run["summary"]["tpot_s"]["p99"] > 0
        workers = {w for s in run["load"] for w in s["workers"]}
        assert len(workers) == 2, run["load"][:2]
    assert os.path.getsize(tmp_path / "r.png") > 10_000
    # Mooncake: prompts built from hash_ids (blocks of 32 tokens at length_scale 1/16)
    config.write_text(f"""name: mooncake-test
target: {{url: {router.url}, api: completions, tokenizer: tiny}}
workload: {{source: mooncake, path: {mooncake}, num_requests: 6, length_scale: 0.0625}}
out: {out}
""")
    done = _run(str(config))
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads(out.read_text())["runs"][0]
    assert run["workload"]["block_tokens"] == 32
    added = run["requests"][0]["prompt_tokens"] - 64
    assert [r["prompt_tokens"] - added for r in run["requests"]] == [64, 96] * 3
