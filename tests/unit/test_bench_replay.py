"""The replay benchmark (scripts/bench/replay): workloads from real trace-format files, the
open-loop streaming sender and its metrics against a real aiohttp server on port 0, the config
parser and the command line."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from scripts.bench.__main__ import main as bench_main
from scripts.bench.replay.client import Result, send_all
from scripts.bench.replay.metrics import SLO, percentile, summarise
from scripts.bench.replay.run import load_config
from scripts.bench.replay.workload import (
    RequestSpec,
    WorkloadConfig,
    WorkloadError,
    build,
)

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.0000000,2000,20
2023-11-16 18:16:01.5000000,100,1000
"""


@pytest.fixture()
def azure(tmp_path: Any) -> str:
    path = tmp_path / "azure.csv"
    path.write_text(AZURE)
    return str(path)


def test_azure_rows_keep_their_arrival_times_and_scaled_capped_lengths(azure: str) -> None:
    cfg = WorkloadConfig(source="azure_conv", path=azure, num_requests=4, time_scale=0.5,
                         length_scale=0.5, max_input_tokens=600, max_output_tokens=128)
    wl = build(cfg)
    assert [round(r.at_s, 3) for r in wl.requests] == [0.0, 2.157, 2.16, 7.41]
    assert [r.prompt_tokens for r in wl.requests] == [187, 198, 600, 50]
    assert [r.output_tokens for r in wl.requests] == [22, 54, 10, 128]
    assert [len(r.prompt.split()) for r in wl.requests] == [187, 198, 600, 50]
    assert wl.description["prompts_capped"] == 1
    assert build(cfg).requests == wl.requests  # deterministic


def test_a_rate_replaces_the_trace_times_with_poisson_arrivals(azure: str) -> None:
    wl = build(WorkloadConfig(source="azure_conv", path=azure, num_requests=4, rate=2.0))
    times = [r.at_s for r in wl.requests]
    assert times[0] == 0.0 and times == sorted(times) and times[1] != 2.157
    assert wl.description["arrivals"] == "poisson 2.0/s"


def test_mooncake_prompts_share_the_blocks_their_hash_ids_share(tmp_path: Any) -> None:
    path = tmp_path / "mc.jsonl"
    rows = [{"timestamp": 0, "input_length": 1500, "output_length": 10, "hash_ids": [0, 1, 2]},
            {"timestamp": 250, "input_length": 1100, "output_length": 20, "hash_ids": [0, 1, 9]},
            {"timestamp": 900, "input_length": 600, "output_length": 5, "hash_ids": [7, 8]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    wl = build(WorkloadConfig(source="mooncake", path=str(path), num_requests=3,
                              length_scale=1 / 16))
    a, b, c = (r.prompt.split() for r in wl.requests)
    assert wl.description["block_tokens"] == 32
    assert [r.at_s for r in wl.requests] == [0.0, 0.25, 0.9]
    assert a[:64] == b[:64] and a[64:] != b[64:len(a)]  # two shared blocks of 32 words
    assert a[:32] != c[:32]
    assert [r.prompt_tokens for r in wl.requests] == [94, 69, 38]
    assert [len(p) for p in (a, b, c)] == [94, 69, 38]


def test_missing_data_and_bad_configs_are_one_line_errors(tmp_path: Any) -> None:
    with pytest.raises(WorkloadError, match="not found"):
        build(WorkloadConfig(source="mooncake", path=str(tmp_path / "none.jsonl")))
    with pytest.raises(ValueError, match="WorkloadConfig.source"):
        WorkloadConfig(source="nope")
    with pytest.raises(ValueError, match="WorkloadConfig.rate"):
        WorkloadConfig(rate=0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("workload: {sourse: azure_conv}\n")
    with pytest.raises(ValueError, match=r"workload: unknown keys \['sourse'\]"):
        load_config(str(bad))
    bad.write_text("target: {api: grpc}\n")
    with pytest.raises(ValueError, match="target.api"):
        load_config(str(bad))
    bad.write_text("rates: [0]\n")
    with pytest.raises(ValueError, match="rates"):
        load_config(str(bad))


def test_percentiles_interpolate_like_numpy() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([], 50) is None


def test_goodput_counts_requests_meeting_both_slos() -> None:
    fast = Result(0, 0.0, ok=True, ttft=0.1, e2e=1.0, output_tokens=10)  # tpot 0.1
    slow_first = Result(1, 0.0, ok=True, ttft=3.0, e2e=4.0, output_tokens=10)
    slow_tokens = Result(2, 0.0, ok=True, ttft=0.1, e2e=5.0, output_tokens=10)
    failed = Result(3, 0.0, error="HTTP 503")
    s = summarise([fast, slow_first, slow_tokens, failed], 2.0, SLO(ttft_ms=1000, tpot_ms=200))
    assert s["completed"] == 3 and s["failed"] == 1 and s["errors"] == ["HTTP 503"]
    assert s["goodput_share"] == 0.25 and s["goodput_requests_per_s"] == 0.5
    assert s["output_tokens_per_s"] == 15.0
    assert s["tpot_s"]["p50"] == pytest.approx(1 / 9)  # 0.1, 1/9, 4.9/9


# -- the sender against a real streaming server ---------------------------------------------------


async def _stream(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    prompt = body.get("prompt") or body["messages"][0]["content"]
    if "fail" in prompt:
        return web.json_response({"error": {"message": "no"}}, status=503)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await asyncio.sleep(0.05)  # time to first token
    for i in range(body["max_tokens"]):
        if "cut" in prompt and i == 2:
            return resp  # the worker died mid-stream: no [DONE]
        chunk = {"choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await asyncio.sleep(0.01)
    usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": body["max_tokens"]}}
    await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
    return resp


@pytest.fixture()
def server() -> Iterator[str]:
    async def start() -> tuple[web.AppRunner, str]:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", _stream)
        app.router.add_post("/v1/completions", _stream)
        async def models(request: web.Request) -> web.Response:
            return web.json_response({"data": [{"id": "fake-model"}]})

        app.router.add_get("/v1/models", models)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return runner, f"http://127.0.0.1:{port}"

    loop = asyncio.new_event_loop()
    runner, url = loop.run_until_complete(start())
    import threading

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield url
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_the_sender_times_every_chunk_and_records_failures(server: str) -> None:
    specs = [RequestSpec(0, 0.0, "hello", 1, 5), RequestSpec(1, 0.1, "please fail", 1, 5),
             RequestSpec(2, 0.1, "cut it", 1, 5)]
    results, wall = asyncio.run(send_all(server, "fake-model", "chat", specs, 30))
    ok, failed, cut = results
    assert ok.ok and ok.output_tokens == 5 and ok.prompt_tokens == 7
    assert 0.04 < ok.ttft < 0.5 and len(ok.itl) == 4 and all(x >= 0.005 for x in ok.itl)
    assert ok.tpot == pytest.approx((ok.e2e - ok.ttft) / 4)
    assert not failed.ok and failed.error.startswith("HTTP 503")
    assert not cut.ok and "without [DONE]" in cut.error
    assert cut.sent_at >= 0.1 and wall >= 0.1


def test_the_command_line_runs_a_config_end_to_end(server: str, azure: str,
                                                     tmp_path: Any) -> None:
    config = tmp_path / "c.yaml"
    out = tmp_path / "out" / "r.json"
    config.write_text(f"""name: t
target: {{url: {server}, api: completions}}
workload: {{source: azure_conv, path: {azure}, num_requests: 4, time_scale: 0.02,
           length_scale: 0.1, max_output_tokens: 6}}
rates: [null, 20.0]
warmup_requests: 1
load_interval_s: 0.05
out: {out}
""")
    assert bench_main(["run", str(config)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "fake-model" and len(result["runs"]) == 2
    first, second = result["runs"]
    assert first["summary"]["completed"] == 4 and second["rate"] == 20.0
    assert [r["output_tokens"] for r in first["requests"]] == [4, 6, 2, 6]
    assert os.path.getsize(str(out).replace(".json", ".png")) > 10_000
    assert bench_main(["run", str(tmp_path / "missing.yaml")]) == 2
